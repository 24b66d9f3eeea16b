//! A test double: a RAM device whose channels finish requests in a scrambled order, some of them several polls
//! late, and which can corrupt every n-th read. It moves data only through the descriptors' owned buffers.

use std::sync::{Arc, Mutex};

use nvstack_blockdev::bdev::{validate, ChannelOpts, Rejected};
use nvstack_blockdev::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoOp, IoStatus, SubmitError};

/// A scrambling RAM device.
pub struct ScrambleDev {
    geo: Geometry,
    data: Arc<Mutex<Vec<u8>>>,
    corrupt_every: Option<u64>,
    refuse_writes: bool,
}

impl ScrambleDev {
    /// The same device, but every write is refused at submit as invalid.
    pub fn refusing_writes(size_bytes: u64, block_size: u32) -> Arc<ScrambleDev> {
        let mut d = ScrambleDev::new(size_bytes, block_size, None);
        if let Some(m) = Arc::get_mut(&mut d) {
            m.refuse_writes = true;
        }
        d
    }

    /// `size_bytes` of zeroes in `block_size` blocks; with `corrupt_every = Some(n)`, every n-th read comes back with
    /// one byte flipped.
    pub fn new(size_bytes: u64, block_size: u32, corrupt_every: Option<u64>) -> Arc<ScrambleDev> {
        Arc::new(ScrambleDev {
            geo: Geometry {
                block_size,
                block_count: size_bytes / u64::from(block_size),
                max_transfer_bytes: 1 << 20,
                optimal_boundary_bytes: 0,
                buf_align_bytes: 1,
                max_segments: 4,
            },
            data: Arc::new(Mutex::new(vec![0; size_bytes as usize])),
            corrupt_every,
            refuse_writes: false,
        })
    }
}

impl BlockDev for ScrambleDev {
    fn name(&self) -> &str {
        "Scramble0"
    }
    fn product_name(&self) -> &'static str {
        "Scramble test disk"
    }
    fn geometry(&self) -> Geometry {
        self.geo
    }
    fn features(&self) -> Features {
        Features::default()
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(ScrambleChannel {
            geo: self.geo,
            data: Arc::clone(&self.data),
            depth: opts.queue_depth as usize,
            pending: Vec::with_capacity(opts.queue_depth as usize),
            rng: 0x1234_5678 + opts.reactor_index as u64,
            reads: 0,
            corrupt_every: self.corrupt_every,
            refuse_writes: self.refuse_writes,
        }))
    }
}

struct ScrambleChannel {
    geo: Geometry,
    data: Arc<Mutex<Vec<u8>>>,
    depth: usize,
    #[allow(clippy::vec_box)]
    pending: Vec<Box<IoDesc>>,
    rng: u64,
    reads: u64,
    corrupt_every: Option<u64>,
    refuse_writes: bool,
}

impl ScrambleChannel {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn execute(&mut self, io: &mut IoDesc) {
        let bs = u64::from(self.geo.block_size);
        let off = (io.offset_blocks * bs) as usize;
        let len = (io.num_blocks * bs) as usize;
        let op = io.op;
        let mut data = self.data.lock().unwrap();
        let Some(buf) = io.bufs_mut().first_mut() else {
            io.status = IoStatus::Failed(nvstack_blockdev::IoError::Aborted);
            return;
        };
        match op {
            IoOp::Read => {
                buf.write_at(0, &data[off..off + len]).unwrap();
                self.reads += 1;
                if self.corrupt_every.is_some_and(|n| self.reads.is_multiple_of(n)) {
                    let b = buf.read_u64(64).unwrap();
                    buf.write_u64(64, b ^ 0x100).unwrap();
                }
            }
            IoOp::Write => buf.read_at(0, &mut data[off..off + len]).unwrap(),
            _ => {}
        }
        io.status = IoStatus::Success;
    }
}

impl IoChannel for ScrambleChannel {
    fn submit(&mut self, io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.pending.len() >= self.depth {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if self.refuse_writes && io.op == IoOp::Write {
            return Err(Rejected { io, why: SubmitError::Invalid(nvstack_blockdev::IoError::Unsupported { op: IoOp::Write }) });
        }
        if let Err(e) = validate(&self.geo, &Features::default(), &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        self.pending.push(io);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        // Finish a random subset, in a random order; the rest wait for later polls.
        let mut n = 0;
        let mut i = 0;
        while i < self.pending.len() && out.len() < out.capacity() {
            if self.rand().is_multiple_of(3) {
                let k = (self.rand() % self.pending.len() as u64) as usize;
                let mut io = self.pending.swap_remove(k);
                self.execute(&mut io);
                out.push(io);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.pending.len()
    }

    fn queue_depth(&self) -> u32 {
        self.depth as u32
    }
}
