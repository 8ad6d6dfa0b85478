//! Checksummed files written atomically: the saved graph (`dense.hnsw`) and the saved chunk
//! table (`table.snap`). A file is `[8-byte magic][body][u32 crc32 of magic and body]`
//! (a body may be cut in sections, each followed by its own checksum: [`SumWriter::seal`]),
//! written to a temporary file, fsynced, renamed over the old one, and the directory
//! fsynced: a crash leaves the old file or the new one, never a mix.

use crate::error::{IndexError, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary file a save writes before renaming it (a crash may leave it behind).
pub fn temp_path(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

/// Writes one checksummed file; nothing replaces `path` until [`SumWriter::finish`].
pub struct SumWriter {
    file: File,
    /// Bytes written so far.
    pos: u64,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    path: PathBuf,
}

const BUF: usize = 1 << 16;

impl SumWriter {
    pub fn create(path: &Path, magic: &[u8; 8]) -> Result<SumWriter> {
        let file = File::create(temp_path(path))?;
        let mut w = SumWriter {
            file,
            pos: 0,
            buf: Vec::with_capacity(BUF * 2),
            crc: crc32fast::Hasher::new(),
            path: path.to_path_buf(),
        };
        w.put(magic)?;
        Ok(w)
    }

    pub fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.pos += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BUF {
            self.drain()?;
        }
        Ok(())
    }

    pub fn u64(&mut self, x: u64) -> Result<()> {
        self.put(&x.to_le_bytes())
    }

    pub fn u32(&mut self, x: u32) -> Result<()> {
        self.put(&x.to_le_bytes())
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self, b: &[u8]) -> Result<()> {
        let len = u32::try_from(b.len()).map_err(|_| IndexError::Internal("field over 4 GiB".into()))?;
        self.u32(len)?;
        self.put(b)
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Ends a section: writes the checksum of everything since the file's start or the last
    /// seal, and starts a new one (a file with sections that are checked separately).
    pub fn seal(&mut self) -> Result<()> {
        self.drain()?;
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        self.file.write_all(&crc.to_le_bytes())?;
        self.pos += 4;
        Ok(())
    }

    fn drain(&mut self) -> Result<()> {
        self.crc.update(&self.buf);
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Appends the checksum, makes the file durable and puts it in place.
    pub fn finish(mut self) -> Result<()> {
        self.drain()?;
        let crc = self.crc.clone().finalize();
        self.file.write_all(&crc.to_le_bytes())?;
        self.file.sync_all()?;
        std::fs::rename(temp_path(&self.path), &self.path)?;
        crate::wal::sync_dir(&self.path)
    }
}

/// A file written by [`SumWriter`] (one section), memory-mapped with its magic and checksum
/// checked: [`Checked::body`] is what lies between them.
pub struct Checked {
    map: memmap2::Mmap,
}

impl Checked {
    pub fn open(path: &Path, magic: &[u8; 8], what: &str) -> Result<Checked> {
        let file = File::open(path)?;
        // SAFETY: these files are only ever replaced by a rename, never written in place.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        if map.len() < 12 || &map[..8] != magic {
            return Err(IndexError::Corrupt(format!("{}: not a ragway {what} file", path.display())));
        }
        let at = map.len() - 4;
        let crc = u32::from_le_bytes(map[at..].try_into().expect("4 bytes"));
        if parallel_crc(&map[..at]) != crc {
            return Err(IndexError::Corrupt(format!("{}: checksum mismatch", path.display())));
        }
        Ok(Checked { map })
    }

    /// Maps a file of two sections — `[magic][bulk][crc of magic and bulk][tail][u64 where
    /// the tail starts in the body][crc of the tail and that u64]` — checking only the tail
    /// on open (the bulk is read where it is used; [`Checked::verify_bulk`] checks it).
    /// Returns the file and where the tail starts in [`Checked::body`].
    pub fn open_tail(path: &Path, magic: &[u8; 8], what: &str) -> Result<(Checked, usize)> {
        let file = File::open(path)?;
        // SAFETY: as in `Checked::open`.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let bad = |why: &str| IndexError::Corrupt(format!("{}: {why}", path.display()));
        if map.len() < 8 + 4 + 8 + 4 || &map[..8] != magic {
            return Err(bad(&format!("not a ragway {what} file")));
        }
        let len = map.len();
        let tail_at = u64::from_le_bytes(map[len - 12..len - 4].try_into().expect("8 bytes"));
        // The tail starts after the bulk's checksum and ends with the u64 that says where.
        let tail_at = usize::try_from(tail_at)
            .ok()
            .filter(|&t| t >= 4 && 8 + t <= len - 12)
            .ok_or_else(|| bad("checksum mismatch"))?;
        let crc = u32::from_le_bytes(map[len - 4..].try_into().expect("4 bytes"));
        if parallel_crc(&map[8 + tail_at..len - 4]) != crc {
            return Err(bad("checksum mismatch"));
        }
        Ok((Checked { map }, tail_at))
    }

    /// Checks the bulk section of a file opened by [`Checked::open_tail`] (`tail_at` as it
    /// returned): reads all of it.
    pub fn verify_bulk(&self, tail_at: usize) -> bool {
        let end = 8 + tail_at - 4;
        let crc = u32::from_le_bytes(self.map[end..end + 4].try_into().expect("4 bytes"));
        parallel_crc(&self.map[..end]) == crc
    }

    pub fn body(&self) -> &[u8] {
        &self.map[8..self.map.len() - 4]
    }

    /// Asks the kernel to start reading these bytes of [`Checked::body`] into the page
    /// cache, without waiting for them (`madvise(WILLNEED)`): reads asked for together
    /// overlap, where page faults wait on one after another. A hint: a refusal only leaves
    /// the pages to be faulted in.
    pub fn will_need(&self, body: std::ops::Range<usize>) {
        #[cfg(unix)]
        {
            let end = body.end.min(self.map.len() - 12);
            if body.start < end {
                let _ = self.map.advise_range(memmap2::Advice::WillNeed, 8 + body.start, end - body.start);
            }
        }
        #[cfg(not(unix))]
        let _ = body;
    }
}

/// The magic a file starts with (`None` when it is shorter).
pub fn magic_of(path: &Path) -> Result<Option<[u8; 8]>> {
    use std::io::Read;
    let mut m = [0u8; 8];
    match File::open(path)?.read_exact(&mut m) {
        Ok(()) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The CRC-32 of `bytes`, computed in 64 MiB pieces on the rayon pool and combined.
fn parallel_crc(bytes: &[u8]) -> u32 {
    use rayon::prelude::*;
    const PIECE: usize = 64 << 20;
    let parts: Vec<crc32fast::Hasher> = bytes
        .par_chunks(PIECE)
        .map(|piece| {
            let mut h = crc32fast::Hasher::new();
            h.update(piece);
            h
        })
        .collect();
    let mut all = crc32fast::Hasher::new();
    for p in &parts {
        all.combine(p);
    }
    all.finalize()
}

/// Reads fields in order; every read is bounds-checked (`None` past the end).
pub struct Cursor<'a> {
    pub data: &'a [u8],
    pub at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, at: 0 }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.data.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub fn is_done(&self) -> bool {
        self.at == self.data.len()
    }
}
