//! The QEMU process: its command line from a scenario, its start with the monitor and control sockets, and its
//! end. QEMU connects to sockets the harness listens on, so no output is lost before the harness attaches.
//! Dropping a [`Qemu`] kills and reaps it; the child also gets `SIGKILL` if the harness dies.

use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::HarnessError;
use crate::scenario::{Scenario, DEFAULT_KERNEL_ARGS};

/// Files of one run, all in its own directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The run directory (removed after the run).
    pub dir: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The concatenated initramfs.
    pub initrd: PathBuf,
}

impl RunPaths {
    /// The guest console (ttyS0) log.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// QEMU's standard error.
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("qemu.stderr")
    }
    /// The QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The control channel socket (guest ttyS1).
    pub fn ctl(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }
    /// Backing image of namespace `j` of controller `i`.
    pub fn nvme_image(&self, i: usize, j: usize) -> PathBuf {
        self.dir.join(format!("nvme{i}n{}.img", j + 1))
    }
    /// Backing file of NVDIMM `i`.
    pub fn pmem_image(&self, i: usize) -> PathBuf {
        self.dir.join(format!("pmem{i}.img"))
    }
}

/// The kernel command line of a scenario.
pub fn kernel_args(s: &Scenario) -> String {
    let base = s.machine.kernel_args.as_deref().unwrap_or(DEFAULT_KERNEL_ARGS);
    let mut a = base.to_string();
    if s.machine.cpus < 2 {
        // isolcpus=1 and friends name a CPU that does not exist on a one-CPU guest.
        a = a.split_whitespace().filter(|w| !w.ends_with("=1") || w.starts_with("panic")).collect::<Vec<_>>().join(" ");
    }
    if !s.machine.extra_kernel_args.is_empty() {
        a.push(' ');
        a.push_str(&s.machine.extra_kernel_args);
    }
    a
}

/// QEMU's arguments for scenario `s` (EMULATION.md's verified command line, generalised).
pub fn args(s: &Scenario, p: &RunPaths) -> Vec<String> {
    let m = &s.machine;
    let mut a: Vec<String> = Vec::new();
    let mut push = |v: &[&str]| a.extend(v.iter().map(|x| x.to_string()));
    let nvdimm = if s.nvdimm.is_empty() { "off" } else { "on" };
    push(&["-nodefaults", "-display", "none", "-no-reboot"]);
    push(&["-machine", &format!("q35,nvdimm={nvdimm},kernel-irqchip=split,accel=tcg")]);
    push(&["-cpu", "max,vendor=GenuineIntel,family=6,model=85,stepping=4"]);
    push(&["-smp", &m.cpus.to_string()]);
    if s.nvdimm.is_empty() {
        push(&["-m", &format!("{}M", m.memory_mb)]);
    } else {
        let max = m.memory_mb.saturating_add(s.nvdimm_total_mb());
        push(&["-m", &format!("{}M,slots={},maxmem={max}M", m.memory_mb, s.nvdimm.len())]);
    }
    if m.intel_iommu {
        push(&["-device", "intel-iommu,intremap=on,caching-mode=on"]);
    }
    for sub in &s.subsystem {
        let nqn = sub.nqn.clone().unwrap_or_else(|| format!("nqn.2024-01.io.nvstack:{}", sub.id));
        push(&["-device", &format!("nvme-subsys,id={},nqn={nqn}", sub.id)]);
    }
    for (i, c) in s.nvme.iter().enumerate() {
        let serial = c.serial.clone().unwrap_or_else(|| format!("nvstack{i}"));
        let mut dev = format!("nvme,id=nvme{i},serial={serial},addr=0x{:02x}", c.slot_for(i));
        if let Some(v) = c.mdts {
            dev.push_str(&format!(",mdts={v}"));
        }
        if let Some(v) = c.max_ioqpairs {
            dev.push_str(&format!(",max_ioqpairs={v}"));
        }
        if let Some(v) = c.cmb_size_mb {
            dev.push_str(&format!(",cmb_size_mb={v}"));
        }
        if let Some(v) = &c.subsystem {
            dev.push_str(&format!(",subsys={v}"));
        }
        push(&["-device", &dev]);
        for (j, ns) in c.namespace.iter().enumerate() {
            let img = p.nvme_image(i, j);
            push(&["-drive", &format!("file={},if=none,id=nvm{i}n{j},format=raw", img.display())]);
            push(&[
                "-device",
                &format!(
                    "nvme-ns,drive=nvm{i}n{j},bus=nvme{i},nsid={},logical_block_size={lba},physical_block_size={lba}",
                    j + 1,
                    lba = ns.lba_size
                ),
            ]);
        }
    }
    for (i, d) in s.nvdimm.iter().enumerate() {
        let img = p.pmem_image(i);
        push(&[
            "-object",
            &format!("memory-backend-file,id=mem{i},share=on,mem-path={},size={}M", img.display(), d.size_mb),
        ]);
        push(&["-device", &format!("nvdimm,id=nv{i},memdev=mem{i}")]);
    }
    push(&["-kernel", &p.kernel.to_string_lossy(), "-initrd", &p.initrd.to_string_lossy()]);
    push(&["-append", &kernel_args(s)]);
    push(&["-chardev", &format!("file,id=con,path={}", p.console().display()), "-serial", "chardev:con"]);
    push(&["-chardev", &format!("socket,id=ctl,path={}", p.ctl().display()), "-serial", "chardev:ctl"]);
    push(&["-chardev", &format!("socket,id=qmp,path={}", p.qmp().display()), "-mon", "chardev=qmp,mode=control"]);
    a
}

/// Create the scenario's fresh sparse images in the run directory.
///
/// # Errors
/// [`HarnessError::Io`].
pub fn create_images(s: &Scenario, p: &RunPaths) -> Result<(), HarnessError> {
    let mk = |path: PathBuf, mb: u64| -> Result<(), HarnessError> {
        let f = File::create(&path).map_err(|e| HarnessError::io("creating an image", &path, e))?;
        f.set_len(mb.saturating_mul(1 << 20)).map_err(|e| HarnessError::io("sizing an image", &path, e))
    };
    for (i, c) in s.nvme.iter().enumerate() {
        for (j, ns) in c.namespace.iter().enumerate() {
            mk(p.nvme_image(i, j), ns.size_mb)?;
        }
    }
    for (i, d) in s.nvdimm.iter().enumerate() {
        mk(p.pmem_image(i), d.size_mb)?;
    }
    Ok(())
}

/// A running QEMU. Dropping it kills and reaps the process.
pub struct Qemu {
    child: Child,
    exited: Option<ExitStatus>,
}

fn bind(path: &Path) -> Result<UnixListener, HarnessError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| HarnessError::io("listening for QEMU", path, e))?;
    l.set_nonblocking(true).map_err(|e| HarnessError::io("listening for QEMU", path, e))?;
    Ok(l)
}

impl Qemu {
    /// Start QEMU with `args` and wait (until `deadline`) for it to connect its monitor and control sockets.
    /// Returns the process, the QMP stream and the control stream.
    ///
    /// # Errors
    /// When QEMU cannot start, exits early (its stderr is in the error), or does not connect in time.
    pub fn start(
        qemu: &Path,
        args: &[String],
        p: &RunPaths,
        deadline: Instant,
    ) -> Result<(Qemu, UnixStream, UnixStream), HarnessError> {
        let qmp_l = bind(&p.qmp())?;
        let ctl_l = bind(&p.ctl())?;
        let stderr = File::create(p.stderr()).map_err(|e| HarnessError::io("creating QEMU's stderr", p.stderr(), e))?;
        let mut cmd = Command::new(qemu);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe; it allocates nothing and touches no locks.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            step: "starting QEMU".into(),
            command: qemu.display().to_string(),
            source,
        })?;
        let mut q = Qemu { child, exited: None };
        let mut qmp = None;
        let mut ctl = None;
        while qmp.is_none() || ctl.is_none() {
            if let Some(st) = q.try_wait() {
                let err = std::fs::read_to_string(p.stderr()).unwrap_or_default();
                return Err(HarnessError::Environment(format!("QEMU exited at start ({st}): {}", err.trim())));
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Environment("QEMU did not connect its sockets in time".into()));
            }
            for (l, slot) in [(&qmp_l, &mut qmp), (&ctl_l, &mut ctl)] {
                if slot.is_none() {
                    match l.accept() {
                        Ok((s, _)) => *slot = Some(s),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(HarnessError::io("accepting QEMU's connection", p.dir.clone(), e)),
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (Some(qmp), Some(ctl)) = (qmp, ctl) else {
            return Err(HarnessError::Environment("QEMU sockets vanished".into()));
        };
        for s in [&qmp, &ctl] {
            s.set_nonblocking(false).map_err(|e| HarnessError::io("configuring a QEMU socket", p.dir.clone(), e))?;
        }
        Ok((q, qmp, ctl))
    }

    /// The exit status, if QEMU has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Wait up to `timeout` for QEMU to exit by itself; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.try_wait().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.try_wait().is_some()
    }

    /// Kill QEMU (if still running) and reap it.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_every_device() {
        let s = Scenario::parse(
            "[machine]\ncpus = 1\n[[subsystem]]\nid = 's0'\n[[nvme]]\nmdts = 2\nmax_ioqpairs = 1\ncmb_size_mb = 16\nsubsystem = 's0'\n\
             [[nvme.namespace]]\nsize_mb = 8\nlba_size = 4096\n[[nvme.namespace]]\nsize_mb = 8\n[[nvdimm]]\nsize_mb = 1024\n\
             [[step]]\nname = 'a'\nrun = 'true'\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let p = RunPaths { dir: "/r".into(), kernel: "/k".into(), initrd: "/i".into() };
        let a = args(&s, &p).join(" ");
        for want in [
            "q35,nvdimm=on,",
            "-m 2048M,slots=1,maxmem=3072M",
            "nvme-subsys,id=s0,nqn=nqn.2024-01.io.nvstack:s0",
            "nvme,id=nvme0,serial=nvstack0,addr=0x04,mdts=2,max_ioqpairs=1,cmb_size_mb=16,subsys=s0",
            "nvme-ns,drive=nvm0n0,bus=nvme0,nsid=1,logical_block_size=4096,physical_block_size=4096",
            "nvme-ns,drive=nvm0n1,bus=nvme0,nsid=2,logical_block_size=512",
            "file=/r/nvme0n2.img,if=none",
            "memory-backend-file,id=mem0,share=on,mem-path=/r/pmem0.img,size=1024M",
            "-serial chardev:con",
            "-mon chardev=qmp,mode=control",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        assert_eq!(kernel_args(&s), "console=ttyS0 intel_iommu=on iommu=pt panic=-1");
    }
}
