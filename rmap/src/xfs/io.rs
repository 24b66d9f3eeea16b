//! Metadata reads through a [`BlockDev`] channel, and a small bounded cache of verified metadata blocks.
//!
//! Buffers come from a [`BufPool`] carved from the arena at open; reads go through [`run_sync`] (a control path:
//! poison lookups are rare). A read that times out leaves its buffer with the device, so that buffer is never
//! reused.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use nvstack_blockdev::bdev::{run_sync, ChannelOpts, Rejected, SyncError};
use nvstack_blockdev::{BlockDev, IoChannel, IoDesc, IoOp, IoStatus};
use nvstack_driver::dma::{Arena, BufPool, DmaBuf};

use crate::error::RmapError;

/// Bytes of each metadata read buffer: the largest XFS block.
pub const READ_BUF_BYTES: u32 = 65536;
/// Read buffers in the pool (more than one so that a timed-out read does not end the reader).
pub const READ_BUF_COUNT: u32 = 4;

/// A synchronous metadata reader over one channel.
pub struct MetaIo {
    device: String,
    channel: Box<dyn IoChannel>,
    pool: BufPool,
    desc: Box<IoDesc>,
    dev_block_bytes: u64,
    dev_bytes: u64,
    chunk_bytes: u64,
    timeout: Duration,
    /// Buffers of timed-out reads: the device may still write them, so they are never touched again.
    quarantine: Vec<DmaBuf>,
}

impl std::fmt::Debug for MetaIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaIo").field("device", &self.device).field("dev_bytes", &self.dev_bytes).finish()
    }
}

impl MetaIo {
    /// Open a channel to `dev` and carve the read buffers from `arena`.
    ///
    /// # Errors
    /// [`RmapError::XfsChannel`], [`RmapError::XfsBuffers`].
    pub fn open(dev: &Arc<dyn BlockDev>, arena: &Arc<Arena>, timeout: Duration) -> Result<MetaIo, RmapError> {
        let device = dev.name().to_string();
        let geo = dev.geometry();
        let align = u64::from(geo.buf_align_bytes.max(4096));
        let pool = BufPool::new(arena, READ_BUF_BYTES, READ_BUF_COUNT, align, "xfs rmap metadata reads")
            .map_err(|source| RmapError::XfsBuffers { device: device.clone(), source })?;
        let channel = dev
            .open_channel(ChannelOpts { reactor_index: 0, queue_depth: 1 })
            .map_err(|source| RmapError::XfsChannel { device: device.clone(), source: Box::new(source) })?;
        let dev_block_bytes = u64::from(geo.block_size.max(1));
        let max = u64::from(geo.max_transfer_bytes).min(u64::from(READ_BUF_BYTES));
        let chunk_bytes = (max / dev_block_bytes) * dev_block_bytes;
        if chunk_bytes == 0 {
            return Err(RmapError::XfsChannel {
                device: device.clone(),
                source: Box::new(nvstack_blockdev::BdevError::Channel {
                    name: device,
                    reason: "block size larger than the largest transfer or than 64 KiB".into(),
                }),
            });
        }
        Ok(MetaIo {
            device,
            channel,
            pool,
            desc: IoDesc::new(1),
            dev_block_bytes,
            dev_bytes: geo.size_bytes(),
            chunk_bytes,
            timeout,
            quarantine: Vec::with_capacity(READ_BUF_COUNT as usize),
        })
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The device's size in bytes.
    pub fn dev_bytes(&self) -> u64 {
        self.dev_bytes
    }

    /// Fill `dst` with the device's bytes from `offset_bytes` (any alignment: reads are widened to device blocks).
    ///
    /// # Errors
    /// [`RmapError::XfsTruncated`] past the end of the device, the read errors otherwise.
    pub fn read(&mut self, offset_bytes: u64, dst: &mut [u8]) -> Result<(), RmapError> {
        let len = dst.len() as u64;
        let end = offset_bytes.checked_add(len).filter(|&e| e <= self.dev_bytes).ok_or(RmapError::XfsTruncated {
            device: self.device.clone(),
            device_bytes: self.dev_bytes,
            needed_bytes: offset_bytes.saturating_add(len),
        })?;
        let mut pos = (offset_bytes / self.dev_block_bytes) * self.dev_block_bytes;
        while pos < end {
            let chunk = self.chunk_bytes.min(self.dev_bytes - pos);
            let chunk = (chunk / self.dev_block_bytes) * self.dev_block_bytes;
            if chunk == 0 {
                return Err(RmapError::XfsTruncated {
                    device: self.device.clone(),
                    device_bytes: self.dev_bytes,
                    needed_bytes: end,
                });
            }
            let buf = self.read_chunk(pos, chunk)?;
            // Copy the overlap of [pos, pos + chunk) and [offset_bytes, end) into dst.
            let from = pos.max(offset_bytes);
            let to = (pos + chunk).min(end);
            let result = match (usize::try_from(from - offset_bytes), usize::try_from(to - from)) {
                (Ok(d), Ok(n)) => dst.get_mut(d..d + n).and_then(|out| buf.read_at((from - pos) as usize, out)),
                _ => None,
            };
            if self.pool.put(buf).is_err() {
                tracing::error!(device = %self.device, "xfs rmap: a read buffer did not return to its pool");
            }
            if result.is_none() {
                return Err(RmapError::XfsQueryRange {
                    device: self.device.clone(),
                    offset_bytes,
                    len_bytes: len,
                    reason: "copy out of the read buffer failed",
                });
            }
            pos += chunk;
        }
        Ok(())
    }

    fn read_chunk(&mut self, pos: u64, chunk: u64) -> Result<DmaBuf, RmapError> {
        let device = &self.device;
        let buf = self.pool.get().ok_or_else(|| RmapError::XfsNoBuffer { device: device.clone() })?;
        let mut desc = std::mem::replace(&mut self.desc, IoDesc::new(0));
        desc.clear_raw_segs();
        desc.prepare(IoOp::Read, pos / self.dev_block_bytes, chunk / self.dev_block_bytes);
        let chunk_u32 = u32::try_from(chunk).unwrap_or(READ_BUF_BYTES);
        let ptr = NonNull::new(buf.as_ptr());
        // SAFETY: the segment is the first `chunk` bytes of `buf` (chunk <= READ_BUF_BYTES, the buffer's length),
        // arena memory at buf.iova(). This function keeps `buf` and touches it only after the request completed
        // (run_sync returned it) or was rejected; a timed-out request's buffer goes to quarantine, never reused.
        let pushed = ptr.map(|p| unsafe { desc.push_seg_raw(p, buf.iova(), chunk_u32) });
        if !matches!(pushed, Some(Ok(()))) {
            self.desc = desc;
            let _ = self.pool.put(buf);
            return Err(RmapError::XfsNoBuffer { device: self.device.clone() });
        }
        match run_sync(self.channel.as_mut(), desc, self.timeout) {
            Ok(mut done) => {
                done.clear_raw_segs();
                let status = done.status;
                self.desc = done;
                match status {
                    IoStatus::Success => Ok(buf),
                    IoStatus::Failed(source) => {
                        let _ = self.pool.put(buf);
                        Err(RmapError::XfsRead { device: self.device.clone(), offset_bytes: pos, len_bytes: chunk, source })
                    }
                    IoStatus::Pending => {
                        let _ = self.pool.put(buf);
                        Err(RmapError::XfsReadSubmit {
                            device: self.device.clone(),
                            offset_bytes: pos,
                            len_bytes: chunk,
                            source: SyncError::Foreign,
                        })
                    }
                }
            }
            Err(SyncError::Rejected(Rejected { mut io, why })) => {
                io.clear_raw_segs();
                self.desc = io;
                let _ = self.pool.put(buf);
                Err(RmapError::XfsReadSubmit {
                    device: self.device.clone(),
                    offset_bytes: pos,
                    len_bytes: chunk,
                    source: SyncError::Rejected(Rejected { io: IoDesc::new(0), why }),
                })
            }
            Err(other) => {
                // Timed out (or the channel was busy with foreign requests): the device may still write `buf`.
                self.quarantine.push(buf);
                self.desc = IoDesc::new(1);
                tracing::warn!(device = %self.device, offset_bytes = pos, "xfs rmap: metadata read lost; its buffer is quarantined");
                Err(RmapError::XfsReadSubmit { device: self.device.clone(), offset_bytes: pos, len_bytes: chunk, source: other })
            }
        }
    }
}

/// A bounded cache of verified metadata blocks (CLOCK replacement). Slots are allocated at open.
#[derive(Debug)]
pub struct BlockCache {
    block_bytes: usize,
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    hand: usize,
    hits: u64,
    misses: u64,
}

#[derive(Debug)]
struct Slot {
    key: Option<u64>,
    agno: u32,
    referenced: bool,
    data: Vec<u8>,
}

impl BlockCache {
    /// A cache of `slots` blocks of `block_bytes` each (0 slots: no caching).
    pub fn new(slots: usize, block_bytes: usize) -> BlockCache {
        BlockCache {
            block_bytes,
            slots: (0..slots).map(|_| Slot { key: None, agno: 0, referenced: false, data: vec![0; block_bytes] }).collect(),
            index: HashMap::with_capacity(slots),
            hand: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Copy the cached block at byte `key` into `dst`; false on a miss.
    pub fn get(&mut self, key: u64, dst: &mut [u8]) -> bool {
        match self.index.get(&key).copied().and_then(|i| self.slots.get_mut(i)) {
            Some(slot) if slot.data.len() == dst.len() => {
                dst.copy_from_slice(&slot.data);
                slot.referenced = true;
                self.hits += 1;
                true
            }
            _ => {
                self.misses += 1;
                false
            }
        }
    }

    /// Remember a verified block.
    pub fn insert(&mut self, key: u64, agno: u32, data: &[u8]) {
        if self.slots.is_empty() || data.len() != self.block_bytes || self.index.contains_key(&key) {
            return;
        }
        let n = self.slots.len();
        // CLOCK: skip (and clear) referenced slots; after one full turn every slot is unreferenced.
        let mut victim = self.hand;
        for _ in 0..=n {
            let Some(slot) = self.slots.get_mut(self.hand) else { break };
            victim = self.hand;
            self.hand = (self.hand + 1) % n;
            if slot.key.is_none() || !slot.referenced {
                break;
            }
            slot.referenced = false;
        }
        if let Some(slot) = self.slots.get_mut(victim) {
            if let Some(old) = slot.key.take() {
                self.index.remove(&old);
            }
            slot.data.copy_from_slice(data);
            slot.key = Some(key);
            slot.agno = agno;
            slot.referenced = false;
            self.index.insert(key, victim);
        }
    }

    /// Forget every block (of AG `agno` only, when given).
    pub fn invalidate(&mut self, agno: Option<u32>) {
        for slot in &mut self.slots {
            if agno.is_none_or(|a| a == slot.agno) {
                if let Some(k) = slot.key.take() {
                    self.index.remove(&k);
                }
            }
        }
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_evicts_and_invalidates() {
        let mut c = BlockCache::new(2, 8);
        let mut out = [0u8; 8];
        assert!(!c.get(0, &mut out));
        c.insert(0, 0, &[1; 8]);
        c.insert(8, 1, &[2; 8]);
        assert!(c.get(0, &mut out) && out == [1; 8]);
        // Block 0 was just used: CLOCK evicts block 8 for the third one.
        c.insert(16, 1, &[3; 8]);
        assert!(c.get(0, &mut out));
        assert!(!c.get(8, &mut out));
        assert!(c.get(16, &mut out) && out == [3; 8]);
        // Wrong-sized data is never cached.
        c.insert(24, 0, &[9; 4]);
        assert!(!c.get(24, &mut out));
        c.invalidate(Some(1));
        assert!(!c.get(16, &mut out));
        assert!(c.get(0, &mut out));
        c.invalidate(None);
        assert!(!c.get(0, &mut out));
        let (hits, misses) = c.stats();
        assert_eq!((hits, misses), (4, 5));
        // A cache of no slots stores nothing.
        let mut none = BlockCache::new(0, 8);
        none.insert(0, 0, &[1; 8]);
        assert!(!none.get(0, &mut out));
    }
}
