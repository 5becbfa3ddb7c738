//! A minimal, safe reader of Python pickles (protocols 0-5) for PyTorch checkpoints.
//!
//! Nothing is ever executed or imported: `GLOBAL`/`STACK_GLOBAL` become a name, `REDUCE`,
//! `NEWOBJ`, `INST`/`OBJ` and `BUILD` become an opaque [`Node::Object`] that remembers its
//! callable, its arguments, its state and any dict/list items set on it. This is enough to walk
//! what real training checkpoints hold (optimizer and scheduler state, yacs `CfgNode`,
//! `argparse.Namespace`, numpy scalars, nested dicts) without understanding those objects, and
//! to recognise the `torch._utils._rebuild_tensor_v2` calls that describe tensors.
//!
//! Values live in an arena indexed by [`Id`], so memo references (`GET`) share a node instead
//! of copying it, and mutations after memoisation (`SETITEMS` on a memoised dict) are seen
//! through every reference. Memory is linear in the pickle's size whatever it references: the
//! only text copied per use is a global's module and name (`STACK_GLOBAL` of memoised strings),
//! at most [`MAX_GLOBAL_NAME`] bytes each, and every node, stack slot, memo entry and copied byte
//! counts against [`MAX_PARSE_BYTES`], so a small hostile file cannot exhaust memory.

use std::collections::HashMap;

/// Index of a node in the arena.
pub type Id = usize;

/// The longest module or class name of a global (real ones are a few dozen bytes).
pub const MAX_GLOBAL_NAME: usize = 1024;

/// The most memory (approximate bytes) the parsed values may take; a weight checkpoint's pickle
/// needs a few MB.
pub const MAX_PARSE_BYTES: usize = 2 << 30;

/// What one node costs the budget: the node, and its id on the stack and later in a container.
const NODE_COST: usize = std::mem::size_of::<Node>() + 2 * std::mem::size_of::<Id>();
/// What one id pushed on the stack (`DUP`, `GET`) costs: the slot, and later in a container.
const ID_COST: usize = 2 * std::mem::size_of::<Id>();
/// What one memo entry costs (key, id and the hash table's slack).
const MEMO_COST: usize = 32;

/// One unpickled value. (Float and byte values are kept for `Debug` output only.)
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in 64 bits (its value is not needed).
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// `module.name`, never imported.
    Global {
        module: String,
        name: String,
    },
    /// `persistent_load(pid)`: in torch zip files, a storage reference.
    PersId(Id),
    /// The result of calling `callable(*args)` (REDUCE, NEWOBJ, INST, OBJ), never performed.
    /// `items`/`list` hold what SETITEM(S)/APPEND(S) put on it (dict and list subclasses such as
    /// `OrderedDict` or yacs `CfgNode`); `state` is the BUILD argument.
    Object {
        callable: Id,
        args: Id,
        items: Vec<(Id, Id)>,
        list: Vec<Id>,
        state: Option<Id>,
    },
}

/// The unpickled arena and the root value.
#[derive(Debug)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Id,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "truncated pickle: {n} bytes wanted at offset {} of {}",
                    self.pos,
                    self.data.len()
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self, n: u64) -> Result<usize, String> {
        usize::try_from(n).map_err(|_| format!("pickle length {n} too large"))
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated pickle: unterminated text argument")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "pickle text argument is not UTF-8")?;
        self.pos += n + 1;
        Ok(s.trim_end_matches('\r'))
    }
}

struct Machine {
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Bytes the values may still take (of `limit`).
    budget: usize,
    limit: usize,
}

impl Machine {
    /// Counts `bytes` more against the budget.
    fn charge(&mut self, bytes: usize) -> Result<(), String> {
        self.budget = self.budget.checked_sub(bytes).ok_or_else(|| {
            format!(
                "malformed pickle: its values take more than {} MiB of memory (a weight \
                 checkpoint's take a few MB); the file is corrupt or not a PyTorch checkpoint",
                self.limit >> 20
            )
        })?;
        Ok(())
    }
    /// Adds `n` to the arena (not to the stack).
    fn add(&mut self, n: Node) -> Result<Id, String> {
        self.charge(NODE_COST)?;
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }
    fn push(&mut self, n: Node) -> Result<(), String> {
        let id = self.add(n)?;
        self.stack.push(id);
        Ok(())
    }
    /// Pushes an existing node again (`DUP`, `GET`).
    fn push_id(&mut self, id: Id) -> Result<(), String> {
        self.charge(ID_COST)?;
        self.stack.push(id);
        Ok(())
    }
    /// A string node holding a copy of `s`.
    fn text(&mut self, s: &str) -> Result<Node, String> {
        self.charge(s.len())?;
        Ok(Node::Str(s.to_string()))
    }
    /// Pushes a string node holding a copy of `s`.
    fn push_text(&mut self, s: &str) -> Result<(), String> {
        let n = self.text(s)?;
        self.push(n)
    }
    fn pop(&mut self) -> Result<Id, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("malformed pickle: pop across a MARK".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "malformed pickle: stack underflow".to_string())
    }
    fn top(&self) -> Result<Id, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| "malformed pickle: empty stack".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let m = self
            .marks
            .pop()
            .ok_or("malformed pickle: no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("malformed pickle: MARK above the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    /// Pushes the global `module.name` (`GLOBAL`, `INST`, `EXT`).
    fn global(&mut self, module: &str, name: &str) -> Result<(), String> {
        let g = global(module, name)?;
        self.push_global(g)
    }
    /// Pushes the global named by string nodes `module` and `name` (`STACK_GLOBAL`).
    fn global_of(&mut self, module: Id, name: Id) -> Result<(), String> {
        let g = match (&self.nodes[module], &self.nodes[name]) {
            (Node::Str(module), Node::Str(name)) => global(module, name)?,
            (a, b) => {
                return Err(format!(
                    "malformed pickle: STACK_GLOBAL expects two strings, got a {} and a {}",
                    kind(a),
                    kind(b)
                ))
            }
        };
        self.push_global(g)
    }
    /// Pushes a global made by [`global`], counting its copied names.
    fn push_global(&mut self, g: Node) -> Result<(), String> {
        if let Node::Global { module, name } = &g {
            self.charge(module.len() + name.len())?;
        }
        self.push(g)
    }
    fn object(&mut self, callable: Id, args: Id) -> Result<(), String> {
        self.push(Node::Object {
            callable,
            args,
            items: Vec::new(),
            list: Vec::new(),
            state: None,
        })
    }
    fn set_items(&mut self, target: Id, kv: Vec<Id>) -> Result<(), String> {
        if !kv.len().is_multiple_of(2) {
            return Err("malformed pickle: SETITEMS with an odd number of values".into());
        }
        let pairs = kv.chunks_exact(2).map(|c| (c[0], c[1]));
        match &mut self.nodes[target] {
            Node::Dict(items) | Node::Object { items, .. } => items.extend(pairs),
            other => {
                return Err(format!(
                    "malformed pickle: SETITEM on a non-dict {}",
                    kind(other)
                ))
            }
        }
        Ok(())
    }
    fn append(&mut self, target: Id, vals: Vec<Id>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::List(l) | Node::Set(l) | Node::Object { list: l, .. } => l.extend(vals),
            other => {
                return Err(format!(
                    "malformed pickle: APPEND on a non-list {}",
                    kind(other)
                ))
            }
        }
        Ok(())
    }
    fn memo_get(&self, k: u64) -> Result<Id, String> {
        self.memo
            .get(&k)
            .copied()
            .ok_or_else(|| format!("malformed pickle: memo entry {k} missing"))
    }
    fn memo_put(&mut self, k: u64) -> Result<(), String> {
        let top = self.top()?;
        self.charge(MEMO_COST)?;
        self.memo.insert(k, top);
        Ok(())
    }
}

/// The global `module.name`; a module or class name over [`MAX_GLOBAL_NAME`] bytes is an
/// error (checked before copying: `STACK_GLOBAL` copies memoised strings at every use).
fn global(module: &str, name: &str) -> Result<Node, String> {
    if let Some(s) = [module, name]
        .into_iter()
        .find(|s| s.len() > MAX_GLOBAL_NAME)
    {
        return Err(format!(
            "malformed pickle: a global's module or class name of {} bytes (at most \
             {MAX_GLOBAL_NAME}; real ones are short)",
            s.len()
        ));
    }
    Ok(Node::Global {
        module: module.to_string(),
        name: name.to_string(),
    })
}

fn kind(n: &Node) -> &'static str {
    match n {
        Node::None => "None",
        Node::Bool(_) => "bool",
        Node::Int(_) | Node::BigInt => "int",
        Node::Float(_) => "float",
        Node::Str(_) => "str",
        Node::Bytes(_) => "bytes",
        Node::Tuple(_) => "tuple",
        Node::List(_) => "list",
        Node::Dict(_) => "dict",
        Node::Set(_) => "set",
        Node::Global { .. } => "global",
        Node::PersId(_) => "persistent id",
        Node::Object { .. } => "object",
    }
}

fn parse_int_line(s: &str) -> Node {
    match s {
        "00" => Node::Bool(false),
        "01" => Node::Bool(true),
        _ => s
            .trim_end_matches('L')
            .parse::<i64>()
            .map(Node::Int)
            .unwrap_or(Node::BigInt),
    }
}

fn long_le(bytes: &[u8]) -> Node {
    if bytes.is_empty() {
        return Node::Int(0);
    }
    if bytes.len() > 8 {
        return Node::BigInt;
    }
    let neg = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut a = if neg { [0xffu8; 8] } else { [0u8; 8] };
    a[..bytes.len()].copy_from_slice(bytes);
    Node::Int(i64::from_le_bytes(a))
}

/// Unpickles `data` without executing anything. Errors describe what is malformed.
pub fn parse(data: &[u8]) -> Result<Pickle, String> {
    parse_limited(data, MAX_PARSE_BYTES)
}

/// [`parse`] with the values taking at most about `limit` bytes.
pub fn parse_limited(data: &[u8], limit: usize) -> Result<Pickle, String> {
    let mut r = Reader { data, pos: 0 };
    let mut m = Machine {
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        budget: limit,
        limit,
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("unsupported pickle protocol {proto}"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: a length hint only
            }
            b'.' => {
                let root = m.pop()?;
                return Ok(Pickle {
                    nodes: m.nodes,
                    root,
                });
            }
            b'(' => {
                m.charge(std::mem::size_of::<usize>())?;
                m.marks.push(m.stack.len())
            }
            b'0' => {
                m.pop()?;
            }
            b'1' => {
                m.pop_mark()?;
            }
            b'2' => {
                let t = m.top()?;
                m.push_id(t)?
            }
            b'N' => m.push(Node::None)?,
            0x88 => m.push(Node::Bool(true))?,
            0x89 => m.push(Node::Bool(false))?,
            b'I' => {
                let n = parse_int_line(r.line()?);
                m.push(n)?
            }
            b'L' => {
                let n = parse_int_line(r.line()?);
                m.push(n)?
            }
            b'J' => {
                let v = r.u32()? as i32;
                m.push(Node::Int(v as i64))?
            }
            b'K' => {
                let v = r.u8()?;
                m.push(Node::Int(v as i64))?
            }
            b'M' => {
                let v = r.u16()?;
                m.push(Node::Int(v as i64))?
            }
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                m.push(long_le(b))?
            }
            0x8b => {
                let n = r.u32()? as i32;
                if n < 0 {
                    return Err("malformed pickle: negative LONG4 length".into());
                }
                let b = r.take(n as usize)?;
                m.push(long_le(b))?
            }
            b'F' => {
                let v = r.line()?.parse::<f64>().unwrap_or(f64::NAN);
                m.push(Node::Float(v))?
            }
            b'G' => {
                let b = r.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                m.push(Node::Float(f64::from_be_bytes(a)))?
            }
            // Strings: text (protocol 0) and length-prefixed.
            b'S' => {
                let s = r.line()?;
                let s = s
                    .strip_prefix(['\'', '"'])
                    .and_then(|s| s.strip_suffix(['\'', '"']))
                    .unwrap_or(s);
                m.push_text(s)?
            }
            b'V' => m.push_text(r.line()?)?,
            b'T' => {
                let n = r.u32()? as i32;
                if n < 0 {
                    return Err("malformed pickle: negative BINSTRING length".into());
                }
                let b = r.take(n as usize)?;
                m.push_text(&String::from_utf8_lossy(b))?
            }
            b'U' => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                m.push_text(&String::from_utf8_lossy(b))?
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.u32()? as u64,
                    0x8c => r.u8()? as u64,
                    _ => r.u64()?,
                };
                let n = r.len(n)?;
                let b = r.take(n)?;
                let s = std::str::from_utf8(b).map_err(|_| "pickle string is not UTF-8")?;
                m.push_text(s)?
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => r.u32()? as u64,
                    b'C' => r.u8()? as u64,
                    _ => r.u64()?,
                };
                let n = r.len(n)?;
                let b = r.take(n)?;
                m.charge(b.len())?;
                m.push(Node::Bytes(b.to_vec()))?
            }
            0x97 => return Err("pickle uses out-of-band buffers (protocol 5), unsupported".into()),
            0x98 => {} // READONLY_BUFFER: no-op on our values
            // Containers.
            b')' => m.push(Node::Tuple(Vec::new()))?,
            b']' => m.push(Node::List(Vec::new()))?,
            b'}' => m.push(Node::Dict(Vec::new()))?,
            0x8f => m.push(Node::Set(Vec::new()))?,
            b't' => {
                let v = m.pop_mark()?;
                m.push(Node::Tuple(v))?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(m.pop()?);
                }
                v.reverse();
                m.push(Node::Tuple(v))?
            }
            b'l' => {
                let v = m.pop_mark()?;
                m.push(Node::List(v))?
            }
            0x91 => {
                let v = m.pop_mark()?;
                m.push(Node::Set(v))?
            }
            b'd' => {
                let v = m.pop_mark()?;
                if !v.len().is_multiple_of(2) {
                    return Err("malformed pickle: DICT with an odd number of values".into());
                }
                let items = v.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                m.push(Node::Dict(items))?
            }
            b'a' => {
                let v = m.pop()?;
                let t = m.top()?;
                m.append(t, vec![v])?
            }
            b'e' | 0x90 => {
                let v = m.pop_mark()?;
                let t = m.top()?;
                m.append(t, v)?
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                let t = m.top()?;
                m.set_items(t, vec![k, v])?
            }
            b'u' => {
                let v = m.pop_mark()?;
                let t = m.top()?;
                m.set_items(t, v)?
            }
            // Memo.
            b'p' => {
                let k = r
                    .line()?
                    .parse::<u64>()
                    .map_err(|_| "malformed pickle: bad PUT index")?;
                m.memo_put(k)?
            }
            b'q' => {
                let k = r.u8()? as u64;
                m.memo_put(k)?
            }
            b'r' => {
                let k = r.u32()? as u64;
                m.memo_put(k)?
            }
            0x94 => {
                let k = m.memo.len() as u64;
                m.memo_put(k)?
            }
            b'g' => {
                let k = r
                    .line()?
                    .parse::<u64>()
                    .map_err(|_| "malformed pickle: bad GET index")?;
                let id = m.memo_get(k)?;
                m.push_id(id)?
            }
            b'h' => {
                let k = r.u8()? as u64;
                let id = m.memo_get(k)?;
                m.push_id(id)?
            }
            b'j' => {
                let k = r.u32()? as u64;
                let id = m.memo_get(k)?;
                m.push_id(id)?
            }
            // Names and calls: recorded, never resolved or performed.
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                m.global(module, name)?
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                m.global_of(module, name)?
            }
            0x82..=0x84 => {
                let code = match op {
                    0x82 => r.u8()? as u32,
                    0x83 => r.u16()? as u32,
                    _ => r.u32()?,
                };
                m.global("copyreg.extension", &code.to_string())?
            }
            b'R' | 0x81 => {
                let args = m.pop()?;
                let callable = m.pop()?;
                m.object(callable, args)?
            }
            0x92 => {
                let _kwargs = m.pop()?;
                let args = m.pop()?;
                let callable = m.pop()?;
                m.object(callable, args)?
            }
            b'i' => {
                let module = r.line()?;
                let name = r.line()?;
                let args = m.pop_mark()?;
                m.global(module, name)?;
                let callable = m.stack.pop().ok_or("malformed pickle: empty stack")?;
                let args = m.add(Node::Tuple(args))?;
                m.object(callable, args)?
            }
            b'o' => {
                let mut v = m.pop_mark()?;
                if v.is_empty() {
                    return Err("malformed pickle: OBJ without a class".into());
                }
                let callable = v.remove(0);
                let args = m.add(Node::Tuple(v))?;
                m.object(callable, args)?
            }
            b'b' => {
                let state = m.pop()?;
                let t = m.top()?;
                // BUILD on a plain value (e.g. a dict): the state is not needed.
                if let Node::Object { state: s, .. } = &mut m.nodes[t] {
                    *s = Some(state);
                }
            }
            b'P' => {
                let n = m.text(r.line()?)?;
                let pid = m.add(n)?;
                m.push(Node::PersId(pid))?
            }
            b'Q' => {
                let pid = m.pop()?;
                m.push(Node::PersId(pid))?
            }
            other => {
                return Err(format!(
                    "unknown pickle opcode 0x{other:02x} at offset {}",
                    r.pos - 1
                ))
            }
        }
    }
}

impl Pickle {
    /// The node `id`.
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// The key/value pairs of a dict or of a dict-like object (OrderedDict, CfgNode, ...).
    pub fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.node(id) {
            Node::Dict(items) => Some(items),
            Node::Object { items, .. } if !items.is_empty() || self.is_dict_class(id) => {
                Some(items)
            }
            _ => None,
        }
    }

    fn is_dict_class(&self, id: Id) -> bool {
        match self.node(id) {
            Node::Object { callable, .. } => matches!(
                self.node(*callable),
                Node::Global { module, name } if module == "collections" && (name == "OrderedDict" || name == "defaultdict")
            ),
            _ => false,
        }
    }

    /// A string node's text.
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer node's value.
    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The elements of a tuple or list.
    pub fn as_seq(&self, id: Id) -> Option<&[Id]> {
        match self.node(id) {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict-like node.
    pub fn get(&self, id: Id, key: &str) -> Option<Id> {
        self.dict_items(id)?
            .iter()
            .find(|(k, _)| self.as_str(*k) == Some(key))
            .map(|(_, v)| *v)
    }

    /// `(module, name)` of the callable of an object node.
    pub fn callable_name(&self, id: Id) -> Option<(&str, &str)> {
        match self.node(id) {
            Node::Object { callable, .. } => match self.node(*callable) {
                Node::Global { module, name } => Some((module, name)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The argument tuple of an object node.
    pub fn call_args(&self, id: Id) -> Option<&[Id]> {
        match self.node(id) {
            Node::Object { args, .. } => self.as_seq(*args),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `\x80\x02`, then `head`, `n` times `op`, `tail` and STOP.
    fn pickle(head: &[u8], op: &[u8], n: usize, tail: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, 2];
        v.extend(head);
        for _ in 0..n {
            v.extend(op);
        }
        v.extend(tail);
        v.push(b'.');
        v
    }

    /// Each way a small pickle grows memory (new nodes, re-pushed ids, marks, memo entries,
    /// copied bytes) counts against the budget: over it, an error, not an allocation.
    #[test]
    fn values_over_the_budget_are_an_error() {
        let cases = [
            ("nodes", pickle(b"](", b"N", 100_000, b"e")),
            ("DUP", pickle(b"N(", b"2", 200_000, b"l")),
            ("marks", pickle(b"", b"(", 200_000, b"N")),
            ("memo", pickle(b"N", b"\x94", 100_000, b"")),
            ("bytes", {
                let mut head = b"B".to_vec();
                head.extend((2u32 << 20).to_le_bytes());
                head.extend(vec![0u8; 2 << 20]);
                pickle(&head, b"", 0, b"")
            }),
        ];
        for (what, data) in cases {
            let err = parse_limited(&data, 1 << 20).unwrap_err();
            assert!(err.contains("more than 1 MiB"), "{what}: {err}");
            assert!(
                parse(&data).is_ok(),
                "{what}: refused under the default limit"
            );
        }
    }

    /// A global's module or class name over the limit is an error before it is copied, and a
    /// STACK_GLOBAL operand that is not a string is reported by kind, not dumped.
    #[test]
    fn long_or_non_string_global_names_are_errors() {
        let long = "m".repeat(MAX_GLOBAL_NAME + 1);
        let text = format!("c{long}\nname\n");
        let err = parse(&pickle(text.as_bytes(), b"", 0, b"")).unwrap_err();
        assert!(err.contains(&format!("{} bytes", long.len())), "{err}");

        let mut head = b"B".to_vec();
        head.extend(4096u32.to_le_bytes());
        head.extend(vec![b'x'; 4096]);
        head.extend(b"X\x01\x00\x00\x00n\x93");
        let err = parse(&pickle(&head, b"", 0, b"")).unwrap_err();
        assert!(
            err.contains("got a bytes and a str") && err.len() < 200,
            "{err}"
        );
    }
}
