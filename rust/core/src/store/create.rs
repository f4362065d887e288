//! Creating a store directory: the data file, its header, the first records and index.json.

use super::format::{self, Geometry, Index, RecordLayout, TensorSpec, DATA_FILE, SHADOW_VERSION};
use super::io::{record_io, Arena, DataFile, Dir, IoPool, JobPriority, SendPtr};
use super::{ExpertStore, Result, Sections, StoreError, StoreOptions};
use std::path::Path;
use std::sync::Arc;

/// Initializer for [`ExpertStore::create`]: fills a zeroed record of `(layer, expert)`.
pub type InitFn<'a> = &'a mut dyn FnMut(usize, usize, &mut [u8]) -> Result<()>;

/// I/O threads and record buffers of [`ExpertStore::create`]: `init` fills one buffer while the
/// record in the other is written, in chunks on the threads, which compute its crc32s as they go.
const CREATE_IO_THREADS: usize = 8;
const CREATE_BUFFERS: usize = 2;

/// Fill every expert's first record slot ([`first_slot`]) with `init` and write it, the next record's `init` overlapping
/// the writes; returns each record's (weights, state) crc32s, by flat index. A failed `init` or
/// write stops the filling; the writes already in flight finish first (they read the buffers).
fn write_initial_records(
    geom: &Geometry,
    data_path: &Path,
    init: InitFn<'_>,
) -> Result<Vec<(u32, u32)>> {
    let rb = geom.layout.record_bytes;
    let file = Arc::new(
        DataFile::open(data_path, true, true).map_err(|e| StoreError::io(data_path, "open", e))?,
    );
    let buffers = Arena::new(CREATE_BUFFERS * rb)
        .map_err(|e| StoreError::io(data_path, "allocate record buffers for", e))?;
    let pool = IoPool::new(CREATE_IO_THREADS);
    let (start, lens) = geom.layout.span(Sections::ALL);
    let chunk = StoreOptions::default().chunk_bytes;
    let (tx, rx) = std::sync::mpsc::channel::<(usize, usize, std::io::Result<Vec<u32>>)>();
    let mut crcs = vec![(0u32, 0u32); geom.num_records()];
    let mut writing: [Option<usize>; CREATE_BUFFERS] = [None; CREATE_BUFFERS]; // record per buffer
    let mut error: Option<StoreError> = None;
    let ne = geom.num_experts;
    // Take one finished write (they finish in any order): its crc32s or its error.
    let take_one =
        |writing: &mut [Option<usize>], crcs: &mut [(u32, u32)], error: &mut Option<StoreError>| {
            let (buffer, flat, res) = rx.recv().expect("every write in flight reports");
            writing[buffer] = None;
            match res {
                Ok(c) => crcs[flat] = geom.layout.section_crcs_of_segments(&c),
                Err(err) => {
                    let what = format!("write (layer {}, expert {}) of", flat / ne, flat % ne);
                    error.get_or_insert(StoreError::io(data_path, &what, err));
                }
            }
        };
    for flat in 0..geom.num_records() {
        let buffer = flat % CREATE_BUFFERS;
        while writing[buffer].is_some() {
            take_one(&mut writing, &mut crcs, &mut error);
        }
        if error.is_some() {
            break;
        }
        let (l, e) = (flat / ne, flat % ne);
        let b = unsafe { buffers.slice_mut(buffer * rb, rb) };
        b.fill(0);
        if let Err(err) = init(l, e, b) {
            error = Some(err);
            break;
        }
        writing[buffer] = Some(flat);
        let tx = tx.clone();
        record_io(
            &pool,
            &file,
            Dir::Write,
            geom.slot_offset(first_slot(geom, flat)) + start as u64,
            SendPtr(b[start..].as_mut_ptr()),
            &lens,
            chunk,
            JobPriority {
                class: JobPriority::WRITE,
                priority: 0,
                seq: flat as u64,
            },
            Box::new(move |res| {
                let _ = tx.send((buffer, flat, res));
            }),
        );
    }
    while writing.iter().any(Option::is_some) {
        take_one(&mut writing, &mut crcs, &mut error);
    }
    match error {
        Some(e) => Err(e),
        None => {
            file.sync_data()
                .map_err(|e| StoreError::io(data_path, "fsync", e))?;
            Ok(crcs)
        }
    }
}

/// The record slot holding expert `flat`'s first version: slot `flat` (version 2), or its
/// shadow slot 0 (version 1).
fn first_slot(geom: &Geometry, flat: usize) -> u32 {
    if geom.version == SHADOW_VERSION {
        2 * flat as u32
    } else {
        flat as u32
    }
}

impl ExpertStore {
    /// Create a store directory: the data file (header, space reserved with fallocate so a full
    /// disk shows up now, not during training), every expert's first record zero-filled or
    /// filled by `init` one record at a time (streaming, O_DIRECT), and the first index.json.
    ///
    /// The file holds one record slot per expert plus `spare_slots` (`None`: one per expert).
    /// A changed record is written to a spare while the committed one stays; a commit frees
    /// the superseded ones. Spares enough for every expert a commit interval changes keep each
    /// commit exact; with fewer, the store commits on its own when they run out (an interim
    /// commit, see [`super::Metrics::interim_commits`]), so every expert stays at a complete,
    /// checksummed version, but not all at the caller's last commit.
    pub fn create(
        dir: &Path,
        num_layers: usize,
        num_experts: usize,
        schema: &[TensorSpec],
        spare_slots: Option<usize>,
        init: Option<InitFn<'_>>,
    ) -> Result<()> {
        let records = num_layers * num_experts;
        let spares = spare_slots.unwrap_or(records);
        if spares == 0 {
            return Err(StoreError::InvalidArgument(
                "spare_slots is 0: a store needs at least one spare record slot to write a \
                 changed record without overwriting the committed one; give at least 1 (better: \
                 the RAM slots, so a commit's flush never waits for an interim commit)"
                    .into(),
            ));
        }
        create_store(
            dir,
            num_layers,
            num_experts,
            schema,
            format::FORMAT_VERSION,
            records + spares,
            init,
        )
    }
}

/// [`ExpertStore::create`] of a given format version (version 1, for the tests of old stores,
/// has `2 * records` slots).
pub(super) fn create_store(
    dir: &Path,
    num_layers: usize,
    num_experts: usize,
    schema: &[TensorSpec],
    version: u32,
    disk_slots: usize,
    init: Option<InitFn<'_>>,
) -> Result<()> {
    if num_layers == 0 || num_experts == 0 {
        return Err(StoreError::InvalidArgument(format!(
            "a store needs at least one layer and one expert (got {num_layers} x {num_experts})"
        )));
    }
    let layout = RecordLayout::new(schema)?;
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "create directory", e))?;
    let data_path = dir.join(DATA_FILE);
    if data_path.exists() {
        return Err(StoreError::InvalidArgument(format!(
                "{} already exists; open it with ExpertStore.open, or delete the directory to recreate it",
                data_path.display()
            )));
    }
    let mut geom = Geometry {
        num_layers,
        num_experts,
        layout,
        data_start: 0,
        version,
        disk_slots,
    };
    let header = format::build_header(&geom);
    geom.data_start = header.len() as u64;
    let rb = geom.layout.record_bytes;
    type Entries = (Vec<(u32, u32, u64)>, Vec<Option<(u32, u32)>>);
    let res = (|| -> Result<Entries> {
        {
            use std::os::fd::AsRawFd;
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&data_path)
                .map_err(|e| StoreError::io(&data_path, "create", e))?;
            f.write_all_at(&header, 0)
                .map_err(|e| StoreError::io(&data_path, "write header", e))?;
            let size = geom.file_size();
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
            match rc {
                0 => {}
                libc::EOPNOTSUPP | libc::EINVAL => f
                    .set_len(size)
                    .map_err(|e| StoreError::io(&data_path, "set length of", e))?,
                e => {
                    return Err(StoreError::io(
                        &data_path,
                        &format!(
                            "reserve {size} bytes ({} records and {} spare slots x {rb} \
                                 bytes) for",
                            geom.num_records(),
                            geom.spare_slots()
                        ),
                        std::io::Error::from_raw_os_error(e),
                    ))
                }
            }
        }
        let zeros = vec![0u8; rb];
        let zero_crc = crc32fast::hash(&zeros);
        let mut entries: Vec<(u32, u32, u64)> = (0..geom.num_records())
            .map(|flat| (first_slot(&geom, flat), zero_crc, 0))
            .collect();
        let mut sections = vec![Some(geom.layout.section_crcs(&zeros)); geom.num_records()];
        if let Some(init) = init {
            let crcs = write_initial_records(&geom, &data_path, init)?;
            for (flat, c) in crcs.into_iter().enumerate() {
                entries[flat].1 = geom.layout.record_crc(c);
                sections[flat] = Some(c);
            }
        }
        Ok((entries, sections))
    })();
    let (entries, section_crcs) = match res {
        Ok(x) => x,
        Err(e) => {
            // A half-made store is worse than none: remove what we created.
            let _ = std::fs::remove_file(&data_path);
            return Err(e);
        }
    };
    let index = Index {
        format: "gmtier-index".into(),
        version,
        num_layers,
        num_experts,
        record_bytes: rb,
        commit: 0,
        user_meta: String::new(),
        interim_commits: 0,
        experts: entries,
        section_crcs,
    };
    index.store_atomic(dir)
}
