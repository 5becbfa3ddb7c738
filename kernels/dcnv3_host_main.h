// Command-line driver shared by the host builds of the DCNv3 kernels (dcnv3_host.cpp: the code
// of dcnv3_common.h through host_shim.h; dcnv3_metal_host.cpp: dcnv3.metal itself through the
// stand-in header host_metal/metal_stdlib). The including file defines, in an anonymous
// namespace, launch_fwd<VEC>(...), launch_bwd<VEC>(...) and kMaxBwdLanes.
//
// Usage: <exe> fwd|bwd <dir> <vec>
//   <dir>/params.bin  the 96-byte Dcnv3Params (little-endian, as in dcnv3_common.h)
//   <dir>/input.bin, offset.bin, mask.bin (+ grad_out.bin for bwd): raw little-endian f32;
//   offset.bin and mask.bin hold pixels*off_pixel and pixels*mask_pixel values (for DCNv4 both
//   are the packed offset_mask tensor; the gradients then come back in two zero-initialised
//   copies of that layout, offsets' columns in grad_offset.bin, masks' in grad_mask.bin).
//   writes <dir>/out.bin (fwd) or grad_input.bin, grad_offset.bin, grad_mask.bin (bwd).
// <vec> selects the template instance (1, 2, 4, 8), as the GPU launchers do.
// Exit status 0 on success; a message on stderr and status 1 otherwise.

#ifndef DCNV3_HOST_MAIN_H
#define DCNV3_HOST_MAIN_H

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace dcn_host_io {

bool read_file(const std::string& path, void* dst, size_t bytes) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        return false;
    }
    const size_t got = std::fread(dst, 1, bytes, f);
    // The file must hold exactly `bytes` bytes.
    const bool at_end = std::fgetc(f) == EOF;
    std::fclose(f);
    if (got != bytes || !at_end) {
        std::fprintf(stderr, "%s: expected exactly %zu bytes\n", path.c_str(), bytes);
        return false;
    }
    return true;
}

bool write_file(const std::string& path, const std::vector<float>& v) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) {
        std::fprintf(stderr, "cannot create %s\n", path.c_str());
        return false;
    }
    const size_t put = std::fwrite(v.data(), sizeof(float), v.size(), f);
    std::fclose(f);
    return put == v.size();
}

bool read_f32(const std::string& path, std::vector<float>& v, size_t n) {
    v.assign(n, 0.0f);
    return read_file(path, v.data(), n * sizeof(float));
}

}  // namespace dcn_host_io

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s fwd|bwd <dir> <vec>\n", argv[0]);
        return 1;
    }
    const std::string mode = argv[1];
    const std::string dir = std::string(argv[2]) + "/";
    const int vec = std::atoi(argv[3]);
    static_assert(sizeof(Dcnv3Params) == 96, "Dcnv3Params must be 96 bytes");
    Dcnv3Params p;
    if (!dcn_host_io::read_file(dir + "params.bin", &p, sizeof(p))) {
        return 1;
    }
    if (vec != 1 && vec != 2 && vec != 4 && vec != 8) {
        std::fprintf(stderr, "vec must be 1, 2, 4 or 8, got %d\n", vec);
        return 1;
    }
    if (p.group_channels % vec != 0 || p.lanes < 1) {
        std::fprintf(stderr, "group_channels %d must be a multiple of vec %d; lanes %d >= 1\n", p.group_channels, vec,
                     p.lanes);
        return 1;
    }
    const size_t c = (size_t)p.group * p.group_channels;
    const size_t n_in = (size_t)p.batch * p.h_in * p.w_in * c;
    const size_t n_pix = (size_t)p.batch * p.h_out * p.w_out;
    const size_t n_off = n_pix * p.off_pixel;
    const size_t n_mask = n_pix * p.mask_pixel;
    // The DCNv3 layout writes every gradient entry; a packed (DCNv4) layout leaves padding.
    const bool dense = p.off_pixel == p.group * p.points * 2 && p.off_group == 2 * p.points &&
                       p.mask_pixel == p.group * p.points && p.mask_group == p.points && p.mask_first == 0;
    const float unwritten = dense ? std::nanf("") : 0.0f;
    const size_t n_out = n_pix * c;
    std::vector<float> input, offset, mask;
    if (!dcn_host_io::read_f32(dir + "input.bin", input, n_in) || !dcn_host_io::read_f32(dir + "offset.bin", offset, n_off) ||
        !dcn_host_io::read_f32(dir + "mask.bin", mask, n_mask)) {
        return 1;
    }
    if (mode == "fwd") {
        std::vector<float> out(n_out, std::nanf(""));  // every element must be written
        switch (vec) {
            case 1: launch_fwd<1>(p, input.data(), offset.data(), mask.data(), out.data()); break;
            case 2: launch_fwd<2>(p, input.data(), offset.data(), mask.data(), out.data()); break;
            case 4: launch_fwd<4>(p, input.data(), offset.data(), mask.data(), out.data()); break;
            default: launch_fwd<8>(p, input.data(), offset.data(), mask.data(), out.data()); break;
        }
        return dcn_host_io::write_file(dir + "out.bin", out) ? 0 : 1;
    }
    if (mode == "bwd") {
        if (p.lanes > kMaxBwdLanes || (p.lanes & (p.lanes - 1)) != 0) {
            std::fprintf(stderr, "backward lanes must be a power of two <= %d here, got %d\n", kMaxBwdLanes, p.lanes);
            return 1;
        }
        std::vector<float> grad_out;
        if (!dcn_host_io::read_f32(dir + "grad_out.bin", grad_out, n_out)) {
            return 1;
        }
        std::vector<float> gin(n_in, 0.0f);  // zero-initialised, as the launcher does
        std::vector<float> goff(n_off, unwritten);  // with DCNv3, every element must be written
        std::vector<float> gmask(n_mask, unwritten);
        const float* a = input.data();
        const float* b = offset.data();
        const float* m = mask.data();
        const float* g = grad_out.data();
        switch (vec) {
            case 1: launch_bwd<1>(p, a, b, m, g, gin.data(), goff.data(), gmask.data()); break;
            case 2: launch_bwd<2>(p, a, b, m, g, gin.data(), goff.data(), gmask.data()); break;
            case 4: launch_bwd<4>(p, a, b, m, g, gin.data(), goff.data(), gmask.data()); break;
            default: launch_bwd<8>(p, a, b, m, g, gin.data(), goff.data(), gmask.data()); break;
        }
        const bool ok = dcn_host_io::write_file(dir + "grad_input.bin", gin) && dcn_host_io::write_file(dir + "grad_offset.bin", goff) &&
                        dcn_host_io::write_file(dir + "grad_mask.bin", gmask);
        return ok ? 0 : 1;
    }
    std::fprintf(stderr, "mode must be fwd or bwd, got %s\n", mode.c_str());
    return 1;
}

#endif  // DCNV3_HOST_MAIN_H
