//! Writing PyTorch-style `.pth` files (a zip with `<prefix>/data.pkl` and one record per storage)
//! from Rust, for checkpoint tests: a small protocol-2 pickle writer that emits the opcodes
//! `torch.save` and the Python pickler emit for tensors, dicts, dict subclasses (yacs
//! `CfgNode`), plain objects (`argparse.Namespace`, schedulers) and numpy scalars.

use std::io::Write;

use candle_core::{DType, Tensor};

/// A Python value to pickle.
#[derive(Debug, Clone)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// A storage-backed tensor: `_rebuild_tensor_v2` of a persistent storage reference.
    Tensor(Tensor),
    /// `cls(*args)` via REDUCE.
    Reduce(&'static str, &'static str, Vec<Py>),
    /// `cls.__new__(cls)` via NEWOBJ, then optional dict items (a dict subclass) and BUILD state.
    Object {
        module: &'static str,
        name: &'static str,
        items: Vec<(Py, Py)>,
        state: Option<Box<Py>>,
    },
    /// The numpy float64 scalar `numpy.float64(v)` as numpy pickles it.
    NumpyF64(f64),
}

/// Shorthand for a string.
pub fn s(v: &str) -> Py {
    Py::Str(v.to_string())
}

/// A dict with string keys.
pub fn dict(items: Vec<(&str, Py)>) -> Py {
    Py::Dict(items.into_iter().map(|(k, v)| (s(k), v)).collect())
}

/// A pickler that collects the tensor storages it references.
pub struct Pickler {
    pub out: Vec<u8>,
    pub storages: Vec<(String, Vec<u8>)>,
    memo: u32,
}

impl Default for Pickler {
    fn default() -> Self {
        Self::new()
    }
}

impl Pickler {
    pub fn new() -> Self {
        Self {
            out: vec![0x80, 2],
            storages: Vec::new(),
            memo: 0,
        }
    }

    fn put(&mut self) {
        // BINPUT / LONG_BINPUT like the Python pickler (memoises every container).
        if self.memo < 256 {
            self.out.extend([b'q', self.memo as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(self.memo.to_le_bytes());
        }
        self.memo += 1;
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend(name.as_bytes());
        self.out.push(b'\n');
        self.put();
    }

    fn str(&mut self, v: &str) {
        self.out.push(b'X');
        self.out.extend((v.len() as u32).to_le_bytes());
        self.out.extend(v.as_bytes());
        self.put();
    }

    fn items(&mut self, items: &[(Py, Py)]) {
        if items.is_empty() {
            return;
        }
        self.out.push(b'(');
        for (k, v) in items {
            self.write(k);
            self.write(v);
        }
        self.out.push(b'u');
    }

    /// Appends the pickle of `v`.
    pub fn write(&mut self, v: &Py) {
        match v {
            Py::None => self.out.push(b'N'),
            Py::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Py::Int(i) => {
                if (0..256).contains(i) {
                    self.out.extend([b'K', *i as u8]);
                } else if i32::try_from(*i).is_ok() {
                    self.out.push(b'J');
                    self.out.extend((*i as i32).to_le_bytes());
                } else {
                    self.out.extend([0x8a, 8]);
                    self.out.extend(i.to_le_bytes());
                }
            }
            Py::Float(f) => {
                self.out.push(b'G');
                self.out.extend(f.to_be_bytes());
            }
            Py::Str(v) => self.str(v),
            Py::Bytes(b) => {
                // Protocol 2 has no bytes opcode: _codecs.encode(latin-1 text, 'latin1').
                self.global("_codecs", "encode");
                let text: String = b.iter().map(|&c| c as char).collect();
                self.str(&text);
                self.str("latin1");
                self.out.push(0x86);
                self.put();
                self.out.push(b'R');
                self.put();
            }
            Py::Tuple(v) => {
                if v.is_empty() {
                    self.out.push(b')');
                } else {
                    self.out.push(b'(');
                    for x in v {
                        self.write(x);
                    }
                    self.out.push(b't');
                    self.put();
                }
            }
            Py::List(v) => {
                self.out.push(b']');
                self.put();
                if !v.is_empty() {
                    self.out.push(b'(');
                    for x in v {
                        self.write(x);
                    }
                    self.out.push(b'e');
                }
            }
            Py::Dict(items) => {
                self.out.push(b'}');
                self.put();
                self.items(items);
            }
            Py::Tensor(t) => self.tensor(t),
            Py::Reduce(module, name, args) => {
                self.global(module, name);
                self.write(&Py::Tuple(args.clone()));
                self.out.push(b'R');
                self.put();
            }
            Py::Object {
                module,
                name,
                items,
                state,
            } => {
                self.global(module, name);
                self.out.push(b')');
                self.out.push(0x81); // NEWOBJ
                self.put();
                self.items(items);
                if let Some(st) = state {
                    self.write(st);
                    self.out.push(b'b');
                }
            }
            Py::NumpyF64(v) => {
                let dtype = Py::Object {
                    module: "numpy",
                    name: "dtype",
                    items: vec![],
                    state: Some(Box::new(Py::Tuple(vec![
                        Py::Int(3),
                        s("<"),
                        Py::None,
                        Py::None,
                        Py::None,
                        Py::Int(-1),
                        Py::Int(-1),
                        Py::Int(0),
                    ]))),
                };
                self.global("numpy.core.multiarray", "scalar");
                self.out.push(b'(');
                self.write(&dtype);
                self.write(&Py::Bytes(v.to_le_bytes().to_vec()));
                self.out.push(b't');
                self.put();
                self.out.push(b'R');
                self.put();
            }
        }
    }

    fn tensor(&mut self, t: &Tensor) {
        let (storage, bytes): (&str, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                "FloatStorage",
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                "LongStorage",
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => panic!("test pickler: unsupported dtype {other:?}"),
        };
        let key = self.storages.len().to_string();
        let numel = t.elem_count();
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // Persistent id ('storage', torch.FloatStorage, key, 'cpu', numel)
        self.out.push(b'(');
        self.str("storage");
        self.global("torch", storage);
        self.str(&key);
        self.str("cpu");
        self.write(&Py::Int(numel as i64));
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.write(&Py::Int(0));
        let dims: Vec<Py> = t.dims().iter().map(|&d| Py::Int(d as i64)).collect();
        let strides: Vec<Py> = t.stride().iter().map(|&d| Py::Int(d as i64)).collect();
        self.write(&Py::Tuple(dims));
        self.write(&Py::Tuple(strides));
        self.write(&Py::Bool(false));
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R');
        self.put();
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
        self.storages.push((key, bytes));
    }

    /// Ends the pickle (STOP) and returns it with the storages.
    pub fn finish(mut self) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        self.out.push(b'.');
        (self.out, self.storages)
    }
}

/// The bytes of a `torch.save`-style zip holding `root`: `archive/data.pkl`, `archive/version`
/// and `archive/data/<key>` per storage, all stored uncompressed.
pub fn pth_bytes(root: &Py) -> Vec<u8> {
    let mut p = Pickler::new();
    p.write(root);
    let (pkl, storages) = p.finish();
    zip_records(
        &[
            ("archive/data.pkl", pkl.as_slice()),
            ("archive/version", b"3\n"),
        ]
        .into_iter()
        .map(|(n, b)| (n.to_string(), b.to_vec()))
        .chain(
            storages
                .into_iter()
                .map(|(k, b)| (format!("archive/data/{k}"), b)),
        )
        .collect::<Vec<_>>(),
    )
}

/// A zip of stored (uncompressed) records.
pub fn zip_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in records {
            z.start_file(name.as_str(), opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// A state dict `{name: tensor}` as a Python dict.
pub fn state_dict(tensors: &[(String, Tensor)]) -> Py {
    Py::Dict(
        tensors
            .iter()
            .map(|(k, t)| (s(k), Py::Tensor(t.clone())))
            .collect(),
    )
}
