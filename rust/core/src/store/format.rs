//! On-disk format: a safetensors-valid data file holding a pool of record slots (version 2:
//! every expert's committed record plus spare slots for the versions written since; version 1:
//! two shadow slots per expert), plus `index.json`, the last committed state. See
//! docs/design.md "The store on disk".

use crate::error::{Result, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// O_DIRECT alignment and the granule every record and section is padded to.
pub const ALIGN: usize = 4096;
/// Tensors inside a section start on this boundary, so SIMD loads and torch dtype views are aligned.
pub const TENSOR_ALIGN: usize = 64;
/// Version written into the header and the index of a new store: 2, the slot pool.
pub const FORMAT_VERSION: u32 = 2;
/// Version 1: two shadow slots per expert, slot `2 * flat + s`; still read and written.
pub const SHADOW_VERSION: u32 = 1;
/// Header and index versions this build reads.
pub const INDEX_VERSIONS_READ: &[u32] = &[SHADOW_VERSION, FORMAT_VERSION];
/// The `__metadata__` key of the header's tensor-table checksum (crc32 of the table's bytes, 8
/// hex digits). Headers written before it existed lack it and are read without the check.
pub const TABLE_CRC_KEY: &str = "tensor_table_crc32";
/// How every header this crate writes begins: the tensor table follows the metadata object.
const HEADER_PREFIX: &str = "{\"__metadata__\":";
/// Name of the data file inside a store directory.
pub const DATA_FILE: &str = "experts.safetensors";
/// Name of the committed index inside a store directory.
pub const INDEX_FILE: &str = "index.json";

/// Round `x` up to a multiple of `a` (a power of two).
pub fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Element types a record tensor may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    /// float32
    F32,
    /// bfloat16
    BF16,
    /// float16
    F16,
    /// int64
    I64,
    /// uint8
    U8,
}

impl DType {
    /// Parse our short names and torch-style names.
    pub fn parse(s: &str) -> Result<DType> {
        let t = s.trim().trim_start_matches("torch.").to_ascii_lowercase();
        Ok(match t.as_str() {
            "f32" | "float32" | "float" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" | "half" => DType::F16,
            "i64" | "int64" | "long" => DType::I64,
            "u8" | "uint8" => DType::U8,
            _ => {
                return Err(StoreError::InvalidArgument(format!(
                    "unknown dtype {s:?}; use one of f32, bf16, f16, i64, u8 \
                     (or float32, bfloat16, float16, int64, uint8)"
                )))
            }
        })
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }
    /// Our short name (used in the schema and in errors).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
    /// The safetensors header spelling.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::I64 => "I64",
            DType::U8 => "U8",
        }
    }
}

/// Which part of a record a tensor belongs to. Weights come first: a GPU slot holds only them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    /// What the GPU needs for forward/backward.
    Weights,
    /// Optimizer state and master weights, used only on the CPU.
    State,
}

impl Section {
    /// Parse "weights" / "state".
    pub fn parse(s: &str) -> Result<Section> {
        match s.trim().to_ascii_lowercase().as_str() {
            "weights" => Ok(Section::Weights),
            "state" => Ok(Section::State),
            _ => Err(StoreError::InvalidArgument(format!(
                "unknown section {s:?}; use \"weights\" or \"state\""
            ))),
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Section::Weights => "weights",
            Section::State => "state",
        }
    }
}

/// A set of record sections (which parts of a record a read brings, which a RAM slot holds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Sections(u8);

impl Sections {
    /// No section.
    pub const NONE: Sections = Sections(0);
    /// The weights section only (what forward needs).
    pub const WEIGHTS: Sections = Sections(1);
    /// The state section only (master weights and optimizer state).
    pub const STATE: Sections = Sections(2);
    /// The whole record.
    pub const ALL: Sections = Sections(3);

    /// Parse "all", "weights" or "state".
    pub fn parse(s: &str) -> Result<Sections> {
        match s.trim().to_ascii_lowercase().as_str() {
            "all" => Ok(Sections::ALL),
            "weights" => Ok(Sections::WEIGHTS),
            "state" => Ok(Sections::STATE),
            _ => Err(StoreError::InvalidArgument(format!(
                "sections must be \"all\", \"weights\" or \"state\", got {s:?}"
            ))),
        }
    }
    /// The set holding one section.
    pub fn of(s: Section) -> Sections {
        match s {
            Section::Weights => Sections::WEIGHTS,
            Section::State => Sections::STATE,
        }
    }
    /// Whether every section of `o` is in `self`.
    pub fn contains(self, o: Sections) -> bool {
        self.0 & o.0 == o.0
    }
    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Union.
    pub fn union(self, o: Sections) -> Sections {
        Sections(self.0 | o.0)
    }
    /// Intersection.
    pub fn intersect(self, o: Sections) -> Sections {
        Sections(self.0 & o.0)
    }
    /// The sections of `self` not in `o`.
    pub fn minus(self, o: Sections) -> Sections {
        Sections(self.0 & !o.0)
    }
    /// Section names, weights first.
    pub fn names(self) -> Vec<&'static str> {
        [Section::Weights, Section::State]
            .into_iter()
            .filter(|&s| self.contains(Sections::of(s)))
            .map(Section::name)
            .collect()
    }
    /// "all", "weights", "state" or "none".
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "none",
            1 => "weights",
            2 => "state",
            _ => "all",
        }
    }
}

/// crc32 of `a` followed by `b`, from their crc32s (`len_b`: bytes of `b`).
pub fn crc_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial_len(crc_a, 0);
    h.combine(&crc32fast::Hasher::new_with_initial_len(crc_b, len_b));
    h.finalize()
}

/// One tensor of the record schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name, unique in the schema, no dots-only or `__pad` prefix.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty = scalar).
    pub shape: Vec<usize>,
    /// Section.
    pub section: Section,
}

impl TensorSpec {
    /// Build a spec from strings, validating dtype and section.
    pub fn new(name: &str, dtype: &str, shape: &[usize], section: &str) -> Result<TensorSpec> {
        Ok(TensorSpec {
            name: name.to_string(),
            dtype: DType::parse(dtype)?,
            shape: shape.to_vec(),
            section: Section::parse(section)?,
        })
    }
    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// A tensor placed inside a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLayout {
    /// The schema entry.
    pub spec: TensorSpec,
    /// Byte offset from the record start (multiple of [`TENSOR_ALIGN`]).
    pub offset: usize,
    /// Bytes.
    pub nbytes: usize,
}

/// Where every tensor of a record lives; derived from the schema alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordLayout {
    /// Tensors in record order (weights first).
    pub tensors: Vec<TensorLayout>,
    /// Bytes of the weights section, padded to [`ALIGN`].
    pub weights_bytes: usize,
    /// Bytes of a whole record (weights + state), a multiple of [`ALIGN`].
    pub record_bytes: usize,
}

impl RecordLayout {
    /// Lay out a schema: weights section first, each section padded to 4096.
    pub fn new(schema: &[TensorSpec]) -> Result<RecordLayout> {
        if schema.is_empty() {
            return Err(StoreError::InvalidArgument(
                "the record schema is empty; give at least one (name, dtype, shape, section)"
                    .into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for t in schema {
            if t.name.is_empty() || t.name.starts_with("__pad") || t.name.contains('"') {
                return Err(StoreError::InvalidArgument(format!(
                    "bad tensor name {:?} in the schema: names must be non-empty, must not start \
                     with __pad and must not contain quotes",
                    t.name
                )));
            }
            if !seen.insert(t.name.clone()) {
                return Err(StoreError::InvalidArgument(format!(
                    "tensor name {:?} appears twice in the schema; names must be unique",
                    t.name
                )));
            }
            if t.nbytes() == 0 {
                return Err(StoreError::InvalidArgument(format!(
                    "tensor {:?} has shape {:?}, which holds no elements; every tensor needs at least one",
                    t.name, t.shape
                )));
            }
        }
        let mut tensors = Vec::with_capacity(schema.len());
        let mut off = 0usize;
        for section in [Section::Weights, Section::State] {
            for t in schema.iter().filter(|t| t.section == section) {
                off = align_up(off, TENSOR_ALIGN);
                tensors.push(TensorLayout {
                    spec: t.clone(),
                    offset: off,
                    nbytes: t.nbytes(),
                });
                off += t.nbytes();
            }
            off = align_up(off, ALIGN);
            if section == Section::Weights {
                // A record with no weights still gets weights_bytes = 0; the GPU tier then has nothing to copy.
            }
        }
        let weights_end = tensors
            .iter()
            .filter(|t| t.spec.section == Section::Weights)
            .map(|t| t.offset + t.nbytes)
            .max()
            .unwrap_or(0);
        Ok(RecordLayout {
            tensors,
            weights_bytes: align_up(weights_end, ALIGN),
            record_bytes: off,
        })
    }

    /// The schema in record order.
    pub fn schema(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(|t| t.spec.clone()).collect()
    }

    /// (start, length) of a section inside the record (length 0 when it holds no tensor).
    pub fn section_range(&self, s: Section) -> (usize, usize) {
        match s {
            Section::Weights => (0, self.weights_bytes),
            Section::State => (self.weights_bytes, self.record_bytes - self.weights_bytes),
        }
    }

    /// The sections that hold at least one byte.
    pub fn nonempty(&self) -> Sections {
        let mut out = Sections::NONE;
        for s in [Section::Weights, Section::State] {
            if self.section_range(s).1 > 0 {
                out = out.union(Sections::of(s));
            }
        }
        out
    }

    /// (start in the record, lengths of the non-empty sections of `secs`, in record order): the
    /// consecutive segments one I/O of those sections moves.
    pub fn span(&self, secs: Sections) -> (usize, Vec<usize>) {
        let mut start = None;
        let mut lens = vec![];
        for sec in [Section::Weights, Section::State] {
            let (off, len) = self.section_range(sec);
            if secs.contains(Sections::of(sec)) && len > 0 {
                start.get_or_insert(off);
                lens.push(len);
            }
        }
        (start.unwrap_or(0), lens)
    }

    /// The (weights, state) crc32s of a whole record from the crc32 of each segment of its
    /// [`Self::span`] (an empty section's crc32 is that of no bytes, 0).
    pub fn section_crcs_of_segments(&self, crcs: &[u32]) -> (u32, u32) {
        match (
            self.weights_bytes > 0,
            self.record_bytes > self.weights_bytes,
        ) {
            (true, true) => (crcs[0], crcs[1]),
            (true, false) => (crcs[0], 0),
            _ => (0, crcs[0]),
        }
    }

    /// The whole record's crc32 from its (weights, state) crc32s.
    pub fn record_crc(&self, (weights, state): (u32, u32)) -> u32 {
        crc_combine(
            weights,
            state,
            (self.record_bytes - self.weights_bytes) as u64,
        )
    }

    /// crc32s of a record's (weights, state) sections.
    pub fn section_crcs(&self, record: &[u8]) -> (u32, u32) {
        let wb = self.weights_bytes;
        (
            crc32fast::hash(&record[..wb]),
            crc32fast::hash(&record[wb..]),
        )
    }

    /// Find a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorLayout> {
        self.tensors.iter().find(|t| t.spec.name == name)
    }
}

/// Store geometry: what the header's `__metadata__` records besides the schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// MoE layers.
    pub num_layers: usize,
    /// Experts per layer.
    pub num_experts: usize,
    /// Record layout.
    pub layout: RecordLayout,
    /// File offset of the first record (8 + header length), a multiple of [`ALIGN`].
    pub data_start: u64,
    /// Format version: [`SHADOW_VERSION`] or [`FORMAT_VERSION`].
    pub version: u32,
    /// Record slots in the file: `2 * num_records` in version 1; `num_records + spares` in
    /// version 2.
    pub disk_slots: usize,
}

impl Geometry {
    /// Number of experts in the store.
    pub fn num_records(&self) -> usize {
        self.num_layers * self.num_experts
    }
    /// Flat expert index.
    pub fn flat(&self, layer: usize, expert: usize) -> usize {
        layer * self.num_experts + expert
    }
    /// File offset of record slot `slot` (in version 1, expert `flat`'s shadow slot `s` is
    /// slot `2 * flat + s`).
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_start + slot as u64 * self.layout.record_bytes as u64
    }
    /// Spare record slots: those beyond one per expert.
    pub fn spare_slots(&self) -> usize {
        self.disk_slots - self.num_records()
    }
    /// Size the data file must have.
    pub fn file_size(&self) -> u64 {
        self.data_start + (self.disk_slots * self.layout.record_bytes) as u64
    }
    /// The safetensors name prefix of record slot `slot`'s tensors: `slots.{slot}` in version
    /// 2; `experts.{layer}.{expert}.{shadow slot}` in version 1.
    fn slot_name(&self, slot: usize) -> String {
        if self.version == SHADOW_VERSION {
            let flat = slot / 2;
            let (l, e) = (flat / self.num_experts, flat % self.num_experts);
            format!("experts.{l}.{e}.{}", slot % 2)
        } else {
            format!("slots.{slot}")
        }
    }
    /// Check a (layer, expert) key against the geometry.
    pub fn check_key(&self, layer: usize, expert: usize) -> Result<()> {
        if layer >= self.num_layers || expert >= self.num_experts {
            return Err(StoreError::InvalidArgument(format!(
                "expert (layer {layer}, expert {expert}) is outside the store, which has {} layers \
                 x {} experts",
                self.num_layers, self.num_experts
            )));
        }
        Ok(())
    }
}

/// Serialized schema entry in the header metadata.
#[derive(Serialize, Deserialize)]
struct SchemaEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    section: String,
}

/// Build the safetensors header text (unpadded JSON) of a geometry (its `data_start` unused).
fn header_json(g: &Geometry) -> String {
    let (num_layers, num_experts, layout) = (g.num_layers, g.num_experts, &g.layout);
    let schema: Vec<SchemaEntry> = layout
        .tensors
        .iter()
        .map(|t| SchemaEntry {
            name: t.spec.name.clone(),
            dtype: t.spec.dtype.name().into(),
            shape: t.spec.shape.clone(),
            section: t.spec.section.name().into(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format", "gmtier-store".to_string());
    meta.insert("version", g.version.to_string());
    if g.version != SHADOW_VERSION {
        meta.insert("disk_slots", g.disk_slots.to_string());
    }
    meta.insert("schema", serde_json::to_string(&schema).unwrap());
    meta.insert("num_layers", num_layers.to_string());
    meta.insert("num_experts", num_experts.to_string());
    meta.insert("record_bytes", layout.record_bytes.to_string());
    meta.insert("weights_bytes", layout.weights_bytes.to_string());
    let table = tensor_table_json(g);
    meta.insert(
        TABLE_CRC_KEY,
        format!("{:08x}", crc32fast::hash(table.as_bytes())),
    );
    let meta = serde_json::to_string(&meta).unwrap();
    let mut s = String::with_capacity(HEADER_PREFIX.len() + meta.len() + table.len() + 1);
    s.push_str(HEADER_PREFIX);
    s.push_str(&meta);
    s.push_str(&table);
    s.push('}');
    s
}

/// The header's tensor table: every record slot's tensors (and padding) as safetensors entries,
/// each starting with a comma (it follows `__metadata__`).
fn tensor_table_json(g: &Geometry) -> String {
    // Built by hand: the header can hold ~10^5 entries and we want one pass, no intermediate Value tree.
    let layout = &g.layout;
    let mut s = String::with_capacity(g.disk_slots * layout.tensors.len() * 96);
    let rb = layout.record_bytes;
    for slot in 0..g.disk_slots {
        let name = g.slot_name(slot);
        let base = slot * rb;
        let mut pos = 0usize;
        let mut k = 0usize;
        let mut pad = |s: &mut String, from: usize, to: usize| {
            if to > from {
                s.push_str(&format!(
                    ",\"{name}.__pad{k}\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                    to - from,
                    base + from,
                    base + to
                ));
                k += 1;
            }
        };
        for t in &layout.tensors {
            pad(&mut s, pos, t.offset);
            let shape: Vec<String> = t.spec.shape.iter().map(|d| d.to_string()).collect();
            s.push_str(&format!(
                ",\"{name}.{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                t.spec.name,
                t.spec.dtype.safetensors_name(),
                shape.join(","),
                base + t.offset,
                base + t.offset + t.nbytes
            ));
            pos = t.offset + t.nbytes;
        }
        pad(&mut s, pos, rb);
    }
    s
}

/// Check the header's tensor table against the checksum in its `__metadata__` (`json`: the
/// header text, padding included). A header without the checksum passes.
fn check_table_crc(
    json: &[u8],
    meta: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<(), String> {
    let Some(want) = meta.get(TABLE_CRC_KEY) else {
        return Ok(());
    };
    let want = want
        .as_str()
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("__metadata__.{TABLE_CRC_KEY} is not a hex crc32"))?;
    let body = json
        .strip_prefix(HEADER_PREFIX.as_bytes())
        .ok_or("the header does not begin with __metadata__")?;
    // Where the metadata object ends, the table begins; it ends at the header's closing brace.
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    values
        .next()
        .and_then(|v| v.ok())
        .ok_or("__metadata__ cannot be parsed")?;
    let start = values.byte_offset();
    let end = json.iter().rposition(|&b| b == b'}');
    let table = end
        .and_then(|e| body.get(start..e.checked_sub(HEADER_PREFIX.len())?))
        .unwrap_or_default();
    let got = crc32fast::hash(table);
    if got != want {
        return Err(format!(
            "the tensor table's checksum does not match (__metadata__ says crc32 {want:08x}, \
             the table has {got:08x}): the table was changed or damaged"
        ));
    }
    Ok(())
}

/// Header bytes (8-byte length + JSON padded with spaces so the data starts 4096-aligned) of a
/// geometry; `data_start` is this header's length.
pub fn build_header(g: &Geometry) -> Vec<u8> {
    let json = header_json(g);
    let total = align_up(8 + json.len(), ALIGN);
    let n = total - 8;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(total, b' ');
    out
}

/// Parse and validate the header of a data file (only `__metadata__` is read; the tensor table
/// is derived from the schema and so need not be parsed).
pub fn read_header(path: &Path, file: &File) -> Result<Geometry> {
    use std::os::unix::fs::FileExt;
    let corrupt = |what: String| {
        StoreError::Corrupt(format!(
            "{}: {what}; this is not a gmtier store data file or its header is damaged — \
             restore it from a backup or recreate the store",
            path.display()
        ))
    };
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|_| corrupt("file is shorter than the 8-byte safetensors header length".into()))?;
    let n = u64::from_le_bytes(len);
    let size = file
        .metadata()
        .map_err(|e| StoreError::io(path, "stat", e))?
        .len();
    if n == 0 || n > 512 << 20 || 8 + n > size {
        return Err(corrupt(format!(
            "header length {n} does not fit a file of {size} bytes"
        )));
    }
    let mut buf = vec![0u8; n as usize];
    file.read_exact_at(&mut buf, 8)
        .map_err(|e| StoreError::io(path, "read header", e))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| corrupt(format!("header is not valid JSON ({e})")))?;
    let meta = v
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("header has no __metadata__".into()))?;
    let get = |k: &str| -> Result<&str> {
        meta.get(k)
            .and_then(|x| x.as_str())
            .ok_or_else(|| corrupt(format!("__metadata__ lacks {k:?}")))
    };
    check_table_crc(&buf, meta).map_err(corrupt)?;
    if get("format")? != "gmtier-store" {
        return Err(corrupt(
            "__metadata__.format is not \"gmtier-store\"".into(),
        ));
    }
    let version: u32 = get("version")?
        .parse()
        .map_err(|_| corrupt("bad version".into()))?;
    if !INDEX_VERSIONS_READ.contains(&version) {
        return Err(StoreError::Corrupt(format!(
            "{}: store format version {version}, this gmtier reads versions {SHADOW_VERSION} and \
             {FORMAT_VERSION}; use a matching gmtier or recreate the store",
            path.display()
        )));
    }
    let num = |k: &str| -> Result<usize> {
        get(k)?
            .parse::<usize>()
            .map_err(|_| corrupt(format!("__metadata__.{k} is not an integer")))
    };
    let entries: Vec<SchemaEntry> = serde_json::from_str(get("schema")?)
        .map_err(|e| corrupt(format!("__metadata__.schema is not a valid schema ({e})")))?;
    let schema = entries
        .iter()
        .map(|s| TensorSpec::new(&s.name, &s.dtype, &s.shape, &s.section))
        .collect::<Result<Vec<_>>>()?;
    let layout = RecordLayout::new(&schema)?;
    let (nl, ne) = (num("num_layers")?, num("num_experts")?);
    if num("record_bytes")? != layout.record_bytes || num("weights_bytes")? != layout.weights_bytes
    {
        return Err(corrupt(
            "record_bytes/weights_bytes disagree with the schema".into(),
        ));
    }
    let data_start = 8 + n;
    if data_start % ALIGN as u64 != 0 {
        return Err(corrupt(format!(
            "data starts at byte {data_start}, not 4096-aligned"
        )));
    }
    let disk_slots = if version == SHADOW_VERSION {
        2 * nl * ne
    } else {
        num("disk_slots")?
    };
    if disk_slots <= nl * ne {
        return Err(corrupt(format!(
            "__metadata__.disk_slots is {disk_slots}, but {nl} x {ne} experts need more (one \
             each, plus at least one spare)"
        )));
    }
    let g = Geometry {
        num_layers: nl,
        num_experts: ne,
        layout,
        data_start,
        version,
        disk_slots,
    };
    if size < g.file_size() {
        return Err(StoreError::Corrupt(format!(
            "{}: file is truncated: it is {size} bytes but {disk_slots} record slots ({nl} layers \
             x {ne} experts and {} spares) x {} bytes need {} bytes; the file was cut short \
             (incomplete copy or full disk) — restore it from a backup or recreate the store",
            path.display(),
            g.spare_slots(),
            g.layout.record_bytes,
            g.file_size()
        )));
    }
    Ok(g)
}

/// One expert's committed state in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Which record slot of the file holds the committed version (see [`Geometry::slot_offset`]).
    pub slot: u32,
    /// crc32 of that record.
    pub crc: u32,
    /// How many commits changed this expert.
    pub gen: u64,
    /// crc32s of the record's (weights, state) sections; `None` in an index written before
    /// section reads existed (such a record is only ever read whole).
    pub sections: Option<(u32, u32)>,
}

/// `index.json`: the last committed state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Index {
    /// Always "gmtier-index".
    pub format: String,
    /// The data file's format version ([`SHADOW_VERSION`] or [`FORMAT_VERSION`]).
    pub version: u32,
    /// Layers (must match the data file).
    pub num_layers: usize,
    /// Experts per layer (must match the data file).
    pub num_experts: usize,
    /// Record size (must match the data file).
    pub record_bytes: usize,
    /// Commit counter.
    pub commit: u64,
    /// The caller's metadata string from the last commit.
    pub user_meta: String,
    /// Commits the store made on its own since the caller's last commit, because the spare
    /// slots ran out (see `docs/design.md`): when not 0, some experts are newer than
    /// `user_meta` says. Absent (0) in older indexes.
    #[serde(default)]
    pub interim_commits: u64,
    /// Per expert, flat `layer * num_experts + expert`: [slot, crc, gen]. In memory the slot is
    /// always the file's record slot; a version 1 file stores the shadow slot (0/1) instead
    /// ([`Index::load`] and [`Index::store_atomic`] convert).
    pub experts: Vec<(u32, u32, u64)>,
    /// Per expert: [weights crc, state crc] of the committed record, or null where unknown
    /// (an index from before section reads lacks the field; older gmtier ignores it).
    #[serde(default)]
    pub section_crcs: Vec<Option<(u32, u32)>>,
}

impl Index {
    /// Entry of a flat expert index.
    pub fn entry(&self, i: usize) -> IndexEntry {
        let (slot, crc, gen) = self.experts[i];
        IndexEntry {
            slot,
            crc,
            gen,
            sections: self.section_crcs.get(i).copied().flatten(),
        }
    }

    /// Read and check `index.json` against the data file's geometry.
    pub fn load(dir: &Path, g: &Geometry) -> Result<Index> {
        let path = dir.join(INDEX_FILE);
        let text = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound(format!(
                    "{} is missing: the store was never committed or the file was deleted; \
                     restore it or recreate the store",
                    path.display()
                ))
            } else {
                StoreError::io(&path, "read", e)
            }
        })?;
        let mut idx: Index = serde_json::from_slice(&text).map_err(|e| {
            StoreError::Corrupt(format!(
                "{} is not a valid gmtier index ({e}); restore it from a backup or recreate the store",
                path.display()
            ))
        })?;
        if !INDEX_VERSIONS_READ.contains(&idx.version) {
            let reads: Vec<String> = INDEX_VERSIONS_READ.iter().map(|v| v.to_string()).collect();
            return Err(StoreError::Corrupt(format!(
                "{} has index version {}, but this gmtier reads index version {} only; open the \
                 store with the gmtier that wrote it, or restore the index from a backup",
                path.display(),
                idx.version,
                reads.join(", ")
            )));
        }
        if idx.version != g.version {
            return Err(StoreError::Corrupt(format!(
                "{} has index version {} but {} has format version {}: the two files come from \
                 different stores — restore the matching pair",
                path.display(),
                idx.version,
                DATA_FILE,
                g.version
            )));
        }
        let slot_limit = if g.version == SHADOW_VERSION {
            2
        } else {
            g.disk_slots as u32
        };
        if idx.format != "gmtier-index"
            || idx.num_layers != g.num_layers
            || idx.num_experts != g.num_experts
            || idx.record_bytes != g.layout.record_bytes
            || idx.experts.len() != g.num_records()
            || idx.experts.iter().any(|e| e.0 >= slot_limit)
            || !(idx.section_crcs.is_empty() || idx.section_crcs.len() == idx.experts.len())
        {
            return Err(StoreError::Corrupt(format!(
                "{} does not match {}: index says {} layers x {} experts x {} bytes ({} entries), \
                 data file says {} x {} x {}; the two files come from different stores — restore \
                 the matching pair",
                path.display(),
                DATA_FILE,
                idx.num_layers,
                idx.num_experts,
                idx.record_bytes,
                idx.experts.len(),
                g.num_layers,
                g.num_experts,
                g.layout.record_bytes
            )));
        }
        if g.version == SHADOW_VERSION {
            for (flat, e) in idx.experts.iter_mut().enumerate() {
                e.0 += 2 * flat as u32;
            }
        }
        let mut used = vec![false; g.disk_slots];
        for (flat, e) in idx.experts.iter().enumerate() {
            if std::mem::replace(&mut used[e.0 as usize], true) {
                return Err(StoreError::Corrupt(format!(
                    "{}: record slot {} is committed for two experts (the second is layer {} \
                     expert {}); the index is damaged — restore it from a backup",
                    path.display(),
                    e.0,
                    flat / g.num_experts,
                    flat % g.num_experts
                )));
            }
        }
        // An index from before section reads: every record is read whole until a commit or a
        // verified whole read records its section crcs.
        idx.section_crcs.resize(idx.experts.len(), None);
        Ok(idx)
    }

    /// The record slots no committed version uses, lowest last (so they are taken in order).
    pub fn free_slots(&self, g: &Geometry) -> Vec<u32> {
        let mut used = vec![false; g.disk_slots];
        for e in &self.experts {
            used[e.0 as usize] = true;
        }
        (0..g.disk_slots as u32)
            .rev()
            .filter(|&s| !used[s as usize])
            .collect()
    }

    /// Replace `index.json` atomically: write a temp file, fsync it, rename, fsync the directory.
    pub fn store_atomic(&self, dir: &Path) -> Result<()> {
        let tmp: PathBuf = dir.join(format!("{INDEX_FILE}.tmp"));
        let text = if self.version == SHADOW_VERSION {
            let mut on_disk = self.clone();
            for e in on_disk.experts.iter_mut() {
                e.0 %= 2;
            }
            serde_json::to_vec(&on_disk)
        } else {
            serde_json::to_vec(self)
        }
        .expect("index serializes");
        let res = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, dir.join(INDEX_FILE))?;
            File::open(dir)?.sync_all()
        })();
        res.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::io(&dir.join(INDEX_FILE), "commit (write index)", e)
        })
    }
}
