//! A test twin of a block device: an image file (or bytes) read with pread, with an overlay of patched sectors so
//! that corruption tests never write the cached image. Reads complete at submit.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use nvstack_blockdev::bdev::{validate, ChannelOpts, Rejected};
use nvstack_blockdev::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoOp, IoStatus, SubmitError};

const SECTOR: u64 = 512;

enum Backing {
    File(File),
    Bytes(Vec<u8>),
}

/// An image as a [`BlockDev`], with patched sectors laid over it.
pub struct ImageDev {
    inner: Arc<Image>,
}

impl std::ops::Deref for ImageDev {
    type Target = Image;
    fn deref(&self) -> &Image {
        &self.inner
    }
}

/// The image itself, shared by the device and its channels.
pub struct Image {
    name: String,
    backing: Backing,
    size_bytes: u64,
    block_size: u32,
    /// The image starts this many bytes into the device (zeros before it), as a filesystem inside a volume.
    shift: u64,
    patches: RwLock<HashMap<u64, Vec<u8>>>,
}

impl ImageDev {
    /// The image file at `path`, with 512-byte device blocks.
    pub fn open(path: &Path) -> std::io::Result<Arc<ImageDev>> {
        let file = File::open(path)?;
        let size_bytes = file.metadata()?.len();
        Ok(Arc::new(ImageDev::new(path.display().to_string(), Backing::File(file), size_bytes, 512)))
    }

    /// The image file at `path`, seen as a device of `size_bytes` (shorter: a truncated device) and `block_size`.
    pub fn open_sized(path: &Path, size_bytes: u64, block_size: u32) -> std::io::Result<Arc<ImageDev>> {
        let file = File::open(path)?;
        Ok(Arc::new(ImageDev::new(path.display().to_string(), Backing::File(file), size_bytes, block_size)))
    }

    /// The image file at `path`, starting `shift_bytes` into a device (zeros before it).
    pub fn open_shifted(path: &Path, shift_bytes: u64) -> std::io::Result<Arc<ImageDev>> {
        let file = File::open(path)?;
        let size_bytes = file.metadata()?.len() + shift_bytes;
        let mut dev = ImageDev::new(path.display().to_string(), Backing::File(file), size_bytes, 512);
        if let Some(img) = Arc::get_mut(&mut dev.inner) {
            img.shift = shift_bytes;
        }
        Ok(Arc::new(dev))
    }

    /// `bytes` at the start of a device of `size_bytes` (zeros after them).
    pub fn from_bytes(name: &str, bytes: Vec<u8>, size_bytes: u64) -> Arc<ImageDev> {
        Arc::new(ImageDev::new(name.to_string(), Backing::Bytes(bytes), size_bytes, 512))
    }

    fn new(name: String, backing: Backing, size_bytes: u64, block_size: u32) -> ImageDev {
        let size_bytes = size_bytes / u64::from(block_size) * u64::from(block_size);
        ImageDev { inner: Arc::new(Image { name, backing, size_bytes, block_size, shift: 0, patches: RwLock::new(HashMap::new()) }) }
    }
}

impl Image {
    fn read_base(&self, offset: u64, dst: &mut [u8]) {
        dst.fill(0);
        if self.shift > 0 {
            // Bytes before the shift stay zero; the rest come from the image.
            let skip = self.shift.saturating_sub(offset).min(dst.len() as u64) as usize;
            let (_, rest) = dst.split_at_mut(skip);
            if !rest.is_empty() {
                self.read_unshifted(offset + skip as u64 - self.shift, rest);
            }
            return;
        }
        self.read_unshifted(offset, dst);
    }

    fn read_unshifted(&self, offset: u64, dst: &mut [u8]) {
        match &self.backing {
            Backing::File(f) => {
                let mut done = 0usize;
                while done < dst.len() {
                    match f.read_at(&mut dst[done..], offset + done as u64) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => done += n,
                    }
                }
            }
            Backing::Bytes(b) => {
                let start = (offset as usize).min(b.len());
                let end = (offset as usize + dst.len()).min(b.len());
                dst[..end - start].copy_from_slice(&b[start..end]);
            }
        }
    }

    /// Read bytes as the device would return them (base and patches).
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) {
        self.read_base(offset, dst);
        let patches = self.patches.read().unwrap();
        if patches.is_empty() {
            return;
        }
        let end = offset + dst.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            if let Some(p) = patches.get(&sector) {
                let s0 = sector * SECTOR;
                let from = s0.max(offset);
                let to = (s0 + SECTOR).min(end);
                dst[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&p[(from - s0) as usize..(to - s0) as usize]);
            }
            sector += 1;
        }
    }

    /// Overwrite `bytes` at `offset` in the overlay.
    pub fn patch(&self, offset: u64, bytes: &[u8]) {
        let first = offset / SECTOR;
        let last = (offset + bytes.len() as u64 - 1) / SECTOR;
        for sector in first..=last {
            let mut cur = vec![0u8; SECTOR as usize];
            self.read_at(sector * SECTOR, &mut cur);
            let s0 = sector * SECTOR;
            for (i, b) in cur.iter_mut().enumerate() {
                let pos = s0 + i as u64;
                if pos >= offset && pos < offset + bytes.len() as u64 {
                    *b = bytes[(pos - offset) as usize];
                }
            }
            self.patches.write().unwrap().insert(sector, cur);
        }
    }

    /// Drop every patch.
    pub fn clear_patches(&self) {
        self.patches.write().unwrap().clear();
    }
}

impl BlockDev for ImageDev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &'static str {
        "XFS test image"
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            block_size: self.block_size,
            block_count: self.size_bytes / u64::from(self.block_size),
            max_transfer_bytes: 1 << 20,
            optimal_boundary_bytes: 0,
            buf_align_bytes: 512,
            max_segments: 16,
        }
    }
    fn features(&self) -> Features {
        Features::default()
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(ImageChannel { dev: Arc::clone(&self.inner), geo: self.geometry(), done: Vec::new(), depth: opts.queue_depth.max(1) }))
    }
}

struct ImageChannel {
    dev: Arc<Image>,
    geo: Geometry,
    #[allow(clippy::vec_box)] // descriptors travel boxed through the IoChannel contract
    done: Vec<Box<IoDesc>>,
    depth: u32,
}

impl IoChannel for ImageChannel {
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.done.len() >= self.depth as usize {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if let Err(e) = validate(&self.geo, &Features::default(), &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        if io.op != IoOp::Read {
            let op = io.op;
            return Err(Rejected { io, why: SubmitError::Invalid(IoError::Unsupported { op }) });
        }
        let mut tmp = vec![0u8; io.seg_bytes() as usize];
        self.dev.read_at(io.offset_blocks * u64::from(self.geo.block_size), &mut tmp);
        // SAFETY: the descriptor is in the channel's hands; tmp holds seg_bytes() bytes.
        unsafe { io.copy_in(tmp.as_ptr()) };
        io.status = IoStatus::Success;
        self.done.push(io);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        let mut n = 0;
        while out.len() < out.capacity() {
            let Some(io) = self.done.pop() else { break };
            out.push(io);
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        self.depth
    }
}
