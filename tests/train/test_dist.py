"""Runs that survive a cluster: --resume auto, pre-emption signals, elastic restarts
under torchrun, two "nodes" on 127.0.0.1, checkpoint safety (ENOSPC, checksums, kept step
checkpoints), a packed file that vanishes or shrinks under a running job, the SLURM scripts, and
a resume on another number of ranks (spawned gloo ranks running the real trainer).

The multi-process tests launch torchrun with the tiny deterministic MAE below on gloo; every
launch gets free ports (bound to port 0 first) and a timeout, so parallel runs never collide and
nothing can hang the suite.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttrain.config import build_config
from fasttrain.train import checkpoint as ckpt_io
from fasttrain.train.checkpoint import CheckpointCorrupt, CheckpointWriteError, load_checkpoint
from fasttrain.train.runlog import read_metrics

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cfg_yaml(tmp_path_factory, tiny_yaml) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(tiny_yaml(data={"batch_size": 4, "val_split": None},
                           run={"log_every": 1, "ckpt_every": 4, "deterministic": True, "dist_timeout_s": 60}))
    return p


def _make_packed(packed_phantoms, root: Path, n: int = 64) -> Path:
    return packed_phantoms(root, n, val_fraction=0.0)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, packed_phantoms) -> Path:
    return _make_packed(packed_phantoms, tmp_path_factory.mktemp("phantoms"))


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _steps(run: Path) -> list[int]:
    """Train steps logged so far; [] before metrics.jsonl exists. read_metrics skips the partial
    last line of a file the running job is appending to."""
    if not (run / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in read_metrics(run) if r["phase"] == "train"]


def _cli(cfg_yaml, packed, out, *extra) -> list[str]:
    return ["-m", "fasttrain.cli", "pretrain", "--config", str(cfg_yaml), "--out", str(out),
            f"--data.path={packed}", "--resume", "auto", *extra]


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until metrics.jsonl shows `step` (the run is mid-way), or fail if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before step {step}: make it longer")
        if max(_steps(run), default=-1) >= step:
            return
        time.sleep(0.02)
    pytest.fail(f"no step {step} within {timeout}s")


def _kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------------------- in-process

def _trainer(cfg_yaml, packed, out, *extra, resume=None):
    """The Trainer `fasttrain pretrain` builds, in this process."""
    from fasttrain.train import loop
    from fasttrain.train.pretrain import build_trainer, check_config
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", f"--run.out={out}", *extra])
    check_config(cfg)
    return build_trainer(cfg, loop.setup(cfg), resume)[0]


def test_resume_auto_starts_fresh_then_resumes_and_keeps_k_step_checkpoints(cfg_yaml, packed, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="fasttrain.train")
    _trainer(cfg_yaml, packed, out, "--run.max_steps=10", "--run.ckpt_every=2", resume="auto").fit()
    assert "no " in caplog.text and "starting fresh" in caplog.text
    ck = out / "checkpoints"
    # keep_checkpoints=2: the newest two step files; last.pt is the same file as the newest
    assert sorted(p.name for p in ck.glob("step_*.pt")) == ["step_00000008.pt", "step_00000010.pt"]
    assert os.path.samefile(ck / "last.pt", ck / "step_00000010.pt")
    caplog.clear()
    tr = _trainer(cfg_yaml, packed, out, "--run.max_steps=12", "--run.ckpt_every=2", "--run.resume=auto")
    assert tr.step.opt_step == 10 and "resuming from" in caplog.text
    tr.fit()
    assert load_checkpoint(ck / "last.pt")["step"]["opt_step"] == 12
    assert _steps(out) == list(range(1, 13))  # one run in metrics.jsonl
    with pytest.raises(Exception, match="run.resume.*true, false or auto"):
        _trainer(cfg_yaml, packed, tmp_path / "x", "--run.resume=sometimes")
    with pytest.raises(Exception, match="unknown signal 'SIGNOPE'"):
        _trainer(cfg_yaml, packed, tmp_path / "x", "--run.preempt_signals=[SIGNOPE]")


def test_checksum_detects_a_changed_tensor(tmp_path):
    p = tmp_path / "a.pt"
    ckpt_io.save_atomic({"model": {"w": torch.arange(6.0)}, "step": {"opt_step": 1}}, p)
    ck = load_checkpoint(p)
    assert ck["checksum"]["algo"] == "sha256-tensors"
    ck["model"]["w"][3] += 1e-6
    torch.save(ck, p)  # the recorded checksum no longer matches
    with pytest.raises(CheckpointCorrupt, match=r"a\.pt: tensor checksum mismatch"):
        load_checkpoint(p)
    p.write_bytes(p.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointCorrupt, match=r"a\.pt: not a readable checkpoint"):
        load_checkpoint(p)


def test_enospc_during_save_keeps_previous_last_pt_and_stops(cfg_yaml, packed, tmp_path, monkeypatch):
    """The second checkpoint write fails with ENOSPC half-way: the run stops with an error naming
    the file and the cause; last.pt still holds (and verifies as) the first checkpoint."""
    out = tmp_path / "run"
    tr = _trainer(cfg_yaml, packed, out, "--run.max_steps=10", "--run.ckpt_every=2")
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *a, **k)
        f.write(b"\0" * 4096)  # some bytes made it, then the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"last\.pt \(no space left on the device\); the previous one is intact"):
        tr.fit()
    ck = out / "checkpoints"
    assert load_checkpoint(ck / "last.pt")["step"]["opt_step"] == 2
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "step_00000002.pt"]  # no temp files left


def test_real_enospc_on_a_small_tmpfs(cfg_yaml, packed, tmp_path):
    """The same with a real full filesystem: a tmpfs with room for one checkpoint and a half, so
    the second write (temp file beside the old last.pt) runs out of space in the kernel."""
    probe = tmp_path / "probe"
    _trainer(cfg_yaml, packed, probe, "--run.max_steps=2", "--run.ckpt_every=2").fit()
    size = (probe / "checkpoints" / "last.pt").stat().st_size
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    room = (size * 3 // 2 + 64 * 1024 + 4095) // 4096 * 4096
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(mnt)], capture_output=True,
                       text=True) if os.geteuid() == 0 and shutil.which("mount") else None
    if r is None or r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() if r else 'needs root'})")
    try:
        out = mnt / "run"
        tr = _trainer(cfg_yaml, packed, out, "--run.max_steps=6", "--run.ckpt_every=2")
        with pytest.raises(CheckpointWriteError, match=r"no space left on the device\); the previous one is intact"):
            tr.fit()
        ck = out / "checkpoints"
        assert load_checkpoint(ck / "last.pt")["step"]["opt_step"] == 2
        assert not [p for p in ck.iterdir() if p.suffix == ".tmp"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_corrupt_last_pt_names_it_and_offers_or_uses_the_previous_kept(cfg_yaml, packed, tmp_path, caplog):
    out = tmp_path / "run"
    _trainer(cfg_yaml, packed, out, "--run.max_steps=8", "--run.ckpt_every=2").fit()
    ck = out / "checkpoints"
    good = _weights(out)
    # a flipped block in the middle of the newest checkpoint (last.pt and step_8 are one file)
    raw = bytearray((ck / "last.pt").read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    (ck / "last.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match=r"last\.pt: .*step_00000006\.pt \(step 6\) verifies: resume "
                                                r"from it with --resume auto"):
        _trainer(cfg_yaml, packed, out, "--run.max_steps=8", "--run.ckpt_every=2", resume=True)
    caplog.set_level("WARNING", logger="fasttrain.train")
    tr = _trainer(cfg_yaml, packed, out, "--run.max_steps=8", "--run.ckpt_every=2", resume="auto")
    assert "resuming from the previous kept checkpoint" in caplog.text and "last.pt" in caplog.text
    assert tr.step.opt_step == 6
    tr.fit()  # steps 7 and 8 again, deterministically: the weights the corrupt file held
    for k, v in good.items():
        assert torch.equal(_weights(out)[k], v), k


def test_packed_file_that_disappears_names_it_and_keeps_last_checkpoint(cfg_yaml, tmp_path, packed_phantoms):
    packed = _make_packed(packed_phantoms, tmp_path / "data", n=48)
    out = tmp_path / "run"
    tr = _trainer(cfg_yaml, packed, out, "--run.ckpt_every=2", "--data.prefetch=1")
    raw = Path(tr.loader.packed.parts[0]._raw_path)
    real_iter = type(tr.loader).__iter__

    def vanish_after_3(self):
        for i, b in enumerate(real_iter(self)):
            if i == 3 and raw.exists():
                raw.unlink()  # the mapping stays readable; the check must still say so
            yield b
    tr.loader.__class__ = type("Vanishing", (type(tr.loader),), {"__iter__": vanish_after_3})
    from fasttrain.format.packed import PackedError
    with pytest.raises(PackedError, match=r"train\.u8: the packed file disappeared under the running job"):
        tr.fit()
    ck = load_checkpoint(out / "checkpoints" / "last.pt")  # verifies
    assert ck["step"]["opt_step"] in (2, 4, 6)  # the prefetch thread ran a few batches ahead of the consumer


@pytest.mark.slow
def test_packed_file_truncated_under_a_running_job_is_a_clear_error(cfg_yaml, tmp_path, packed_phantoms):
    """In a subprocess: were the check missing, the gather would touch a page past the new end
    and SIGBUS would kill the process without a word (returncode -7). With it: exit 2 and an
    error naming the file; the last checkpoint verifies.

    Up to three runs: a truncation that lands between the check and the gather it guards (a
    window of microseconds the check cannot close; seen once in ~20 full suites) still SIGBUSes.
    Without the check every run does, so the test still fails then."""
    packed = _make_packed(packed_phantoms, tmp_path / "data", n=48)
    raw = packed / "raw" / "train.u8"
    whole = raw.read_bytes()
    for attempt in range(3):
        raw.write_bytes(whole)
        out = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([PY, *_cli(cfg_yaml, packed, out, "--run.ckpt_every=2", "--data.prefetch=1")],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _wait_for_step(out, 3, proc)
            os.truncate(raw, len(whole) // 4)
            _, err = proc.communicate(timeout=120)
        finally:
            _kill_tree(proc)
        if proc.returncode != -signal.SIGBUS:
            break
    assert proc.returncode == 2, err[-2000:]
    assert "train.u8: the packed file was truncated under the running job" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"]["opt_step"] >= 2


# ----------------------------------------------------------------------------- one process, signals

@pytest.mark.slow
def test_signal_mid_epoch_then_resume_auto_equals_uninterrupted(cfg_yaml, packed, tmp_path):
    """SIGUSR1 mid-epoch (then SIGTERM a moment later, during the stop): last.pt is written at the
    step boundary, "pre-empted at step N" is logged, the exit code is run.preempt_exit_code; the
    same command line again (--resume auto) ends bit-identical to the uninterrupted run. Periodic
    checkpoints are off, so only the pre-emption save can make the resume exact."""
    extra = ["--run.ckpt_every=0", "--run.preempt_exit_code=75"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = subprocess.run([PY, *_cli(cfg_yaml, packed, full, *extra)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen([PY, *_cli(cfg_yaml, packed, cut, *extra)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(cut, 5, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # a second signal: ignored, the save stays whole
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 75, err[-2000:]
    stopped = load_checkpoint(cut / "checkpoints" / "last.pt")["step"]["opt_step"]
    assert f"pre-empted at step {stopped}" in err and 5 <= stopped < 32
    r = subprocess.run([PY, *_cli(cfg_yaml, packed, cut, *extra)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    _assert_same_weights(full, cut)
    assert _steps(cut) == _steps(full)


# ----------------------------------------------------------------------------- torchrun

def _torchrun(*args) -> list[str]:
    return [PY, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def reference_2proc(cfg_yaml, packed, tmp_path_factory) -> Path:
    """One node x 2 processes, uninterrupted: what every multi-process variant must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(_torchrun("--standalone", "--nproc_per_node=2", *_cli(cfg_yaml, packed, out)),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _worker_pid(agent: int, rank: int, timeout: float = 60) -> int:
    """The pid of the torchrun worker (a child of `agent`) with RANK=rank."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == agent and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    return int(d.name)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.05)
    pytest.fail(f"no worker with RANK={rank} under torchrun pid {agent}")


@pytest.mark.slow
def test_sigkill_one_rank_under_max_restarts_resumes_bit_identical(cfg_yaml, packed, reference_2proc, tmp_path):
    """No hang after SIGKILL of rank 1: torchrun restarts the group; the new workers
    must rendezvous cleanly (per-restart store prefix) and resume from last.pt (--resume auto)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=2",
                                      "--monitor-interval=0.2", *_cli(cfg_yaml, packed, out)),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        last = out / "checkpoints" / "last.pt"
        deadline = time.time() + 240
        while not (last.is_file() and max(_steps(out), default=0) >= 6):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.02)
        os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=240)  # a hang fails here instead of blocking the suite
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, err[-4000:]
    assert "resuming from" in err  # the restarted group resumed (not a fresh start)
    _assert_same_weights(reference_2proc, out)


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_node_two_processes(cfg_yaml, packed, reference_2proc, tmp_path, free_port):
    """Two torchrun launches as two nodes (c10d rendezvous on 127.0.0.1) end where one node x 2
    processes ends."""
    out = tmp_path / "run"
    port = free_port()
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              f"--rdzv-id=test{port}"]
    procs = [subprocess.Popen(_torchrun(*common, f"--node-rank={i}", *_cli(cfg_yaml, packed, out)),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            _kill_tree(p)
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e[-3000:]
    _assert_same_weights(reference_2proc, out)


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(cfg_yaml, packed, reference_2proc, tmp_path):
    """SIGUSR1 reaches rank 1 only: both ranks agree to stop at one boundary (rank 0 is not left
    waiting in a collective), last.pt is written, and --resume auto ends bit-identical."""
    out = tmp_path / "run"
    launch = _torchrun("--standalone", "--nproc_per_node=2", *_cli(cfg_yaml, packed, out, "--run.ckpt_every=0"))
    proc = subprocess.Popen(launch, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(out, 5, proc)
        os.kill(_worker_pid(proc.pid, 1), signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc)
    assert proc.returncode != 0  # torchrun reports the workers' exit code 75 as a failure
    stopped = load_checkpoint(out / "checkpoints" / "last.pt")["step"]["opt_step"]
    assert f"pre-empted at step {stopped}" in err and re.search(r"exitcode\s*:\s*75\b", err), err[-3000:]
    r = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_weights(reference_2proc, out)


# ----------------------------------------------------------------------------- SLURM

SLURM = REPO / "scripts" / "slurm"


def test_slurm_scripts_pass_bash_n():
    for f in ("pretrain.sbatch", "finetune.sbatch", "torchrun_node.sh"):
        r = subprocess.run(["bash", "-n", str(SLURM / f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{f}: {r.stderr}"
    text = (SLURM / "pretrain.sbatch").read_text()
    for directive in ("--signal=USR1@120", "--requeue", "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in text
    assert "--resume auto" in (SLURM / "torchrun_node.sh").read_text()


class MiniSlurm:
    """A one-node SLURM (munged + slurmctld + slurmd) in a temp folder, from Debian's slurm-wlm
    packages; `start()` returns None or the reason it could not start (the test then skips)."""

    def __init__(self, root: Path, free_port):
        self.root = root
        self.free_port = free_port
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _log_tail(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-400:]!r}" for p in sorted(self.root.glob("*.log")))

    def start(self) -> str | None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.sock"
        self.procs.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munged.log'}",
             f"--seed-file={r / 'munge' / 'munged.seed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + 20
        while not sock.exists():
            if self.procs[0].poll() is not None or time.time() > deadline:
                return f"munged did not start: {self._log_tail()}"
            time.sleep(0.1)
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        self.conf.write_text(f"""
ClusterName=fasttrain-test
SlurmctldHost={self.host}
SlurmctldPort={self.free_port()}
SlurmdPort={self.free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
KillWait=30
NodeName={self.host} CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", self.host], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                return f"a SLURM daemon exited: {self._log_tail()}"
            s = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if s.returncode == 0 and s.stdout.strip() == "idle":
                return None
            time.sleep(0.5)
        return f"the node did not become idle within 60 s: {self._log_tail()}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def mini_slurm(tmp_path, free_port):
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol") if not shutil.which(b)]
    if missing:
        pytest.skip(f"SLURM is not installed here (no {', '.join(missing)}); "
                    "Debian: apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the SLURM daemons need root (slurmd starts jobs as their user)")
    cluster = MiniSlurm(tmp_path / "slurm", free_port)
    try:
        why = cluster.start()
        if why is not None:
            pytest.skip(f"SLURM daemons could not start here: {why}")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_sbatch_pretrain_runs_on_one_node_slurm_and_requeues_after_usr1(mini_slurm, cfg_yaml, packed, tmp_path):
    """scripts/slurm/pretrain.sbatch for real (minus its GPU request): the job starts torchrun
    through srun; USR1 (what --signal=USR1@120 sends) makes it save, exit 75 and requeue itself;
    the requeued job resumes (--resume auto) and finishes."""
    script = tmp_path / "pretrain.sbatch"
    script.write_text((SLURM / "pretrain.sbatch").read_text().replace("#SBATCH --gpus-per-node=8\n", "")
                      .replace("#SBATCH --cpus-per-task=32\n", "#SBATCH --cpus-per-task=1\n"))
    run = tmp_path / "run"
    env = {**mini_slurm.env, "RUN": str(run), "CONFIG": str(cfg_yaml), "DATA": str(packed), "NPROC_PER_NODE": "1",
           "PYTHON": PY, "FASTTRAIN_REPO": str(REPO), "EXTRA": "--run.ckpt_every=0 --optim.epochs=3",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'job-%j.out'}", str(script)], env=env,
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out = lambda: "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))  # noqa: E731

    def state() -> str:
        s = subprocess.run(["scontrol", "show", "job", job], env=mini_slurm.env, capture_output=True, text=True)
        m = re.search(r"JobState=(\w+)", s.stdout)
        return m.group(1) if m else "GONE"
    deadline = time.time() + 300
    while max(_steps(run), default=0) < 5:
        assert time.time() < deadline and state() in ("PENDING", "RUNNING", "CONFIGURING"), out()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=mini_slurm.env, check=True)
    # SLURM holds a requeued job for AuthInfo's cred_expire (120 s by default, 10 s in this
    # cluster's slurm.conf): until then slurmd still holds the old run's revoked credential, and
    # starting it early (scontrol update StartTime=now) makes it fail with "Job credential revoked"
    deadline = time.time() + 400
    while state() not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.time() < deadline, out()
        time.sleep(0.5)
    log = out()
    assert state() == "COMPLETED", log[-4000:]
    assert "pre-empted at step" in log and "requeueing job" in log, log[-4000:]
    assert "resuming from" in log and (run / "summary.json").is_file(), log[-4000:]


# ----------------------------------------------------------------------------- another world size

class _Recording:
    """The trainer's loader, recording (epoch, optimiser step, split positions) of every batch the
    loop consumes; on the rank given `signal_at`, SIGUSR1 to itself when step `signal_at` starts."""

    def __init__(self, inner, trainer, reads: list, signal_at=None):
        self.inner, self.trainer, self.reads, self.signal_at = inner, trainer, reads, signal_at
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch, start_step)

    def __iter__(self):
        for x, y, pos in self.inner.iter_with_index():
            step = self.trainer.step.opt_step
            self.reads.append([self.epoch, step, pos.tolist()])
            if step == self.signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield x, y


def _layout_rank(rank: int, world: int, port: int, cfg_yaml: str, overrides: list, signal_at,
                 outdir: str) -> None:
    """One spawned rank of `_run_ranks`: the trainer `fasttrain pretrain --resume auto` builds, its
    loader recorded; writes outdir/rank<r>.json."""
    import json

    from fasttrain.train import loop
    from fasttrain.train.dist import cleanup
    from fasttrain.train.pretrain import build_trainer, check_config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = build_config(cfg_yaml, overrides)
    check_config(cfg)
    info = loop.setup(cfg)
    try:
        trainer = build_trainer(cfg, info, "auto")[0]
        reads: list = []
        trainer.loader = _Recording(trainer.loader, trainer, reads, signal_at if rank == world - 1 else None)
        code = 0
        try:
            trainer.fit()
        except loop.Preempted as e:
            code = e.exit_code
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(
            {"reads": reads, "code": code, "steps": trainer.step.opt_step, "lr": trainer.step.last_lr,
             "batch": cfg.data.batch_size, "accum": trainer.accum}))
    finally:
        cleanup(info)
    # the record is written: leave without the interpreter's teardown, as the CLI does for a
    # pre-empted rank (that teardown aborted with SIGABRT about once in five suites here)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ranks(world: int, port: int, cfg_yaml: Path, overrides: list, outdir: Path, signal_at=None) -> list[dict]:
    """`world` real gloo ranks (spawned: see the gloo_positions fixture) -> each rank's record."""
    import json

    import torch.multiprocessing as mp
    outdir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_layout_rank, args=(world, port, str(cfg_yaml), overrides, signal_at, str(outdir)),
                       nprocs=world, join=True, start_method="spawn")
    return [json.loads((outdir / f"rank{k}.json").read_text()) for k in range(world)]


def _by_step(records: list[dict]) -> dict[int, list[int]]:
    """Optimiser step -> the sorted split positions every rank read for it."""
    out: dict[int, list[int]] = {}
    for rec in records:
        for _, step, pos in rec["reads"]:
            out.setdefault(step, []).extend(pos)
    return {k: sorted(v) for k, v in out.items()}


def test_preempted_on_two_ranks_resumes_exactly_on_one_and_on_four(cfg_yaml, packed, tmp_path, free_port):
    """2 ranks x 4 images x accum 2 (global batch 16), SIGUSR1 mid-epoch 1 of 3, then resumed with
    the same command on 1 rank (accum 4) and on 4 ranks (accum 1): each optimiser step reads the
    same 16 images as in the uninterrupted 2-rank run, so every image of the interrupted epoch is
    read exactly once, and the step count and the final lr are the uninterrupted run's."""
    args = lambda out: [f"--data.path={packed}", f"--run.out={out}", "--optim.epochs=3",  # noqa: E731
                        "--optim.accum_steps=2", "--optim.warmup_epochs=1", "--run.ckpt_every=0", "--run.log_every=2",
                        "--run.dist_timeout_s=300"]  # 4 ranks importing torch on 2 busy cores: a slow rendezvous
    full = _run_ranks(2, free_port(), cfg_yaml, args(tmp_path / "full"), tmp_path / "rec-full")
    ref = _by_step(full)
    per_epoch = len(ref) // 3  # the train split's images // 16
    assert per_epoch >= 3 and sorted(ref) == list(range(3 * per_epoch)) and all(len(v) == 16 for v in ref.values())
    cut = _run_ranks(2, free_port(), cfg_yaml, args(tmp_path / "cut"), tmp_path / "rec-cut", signal_at=per_epoch)
    assert all(r["code"] == 75 for r in cut)
    stopped = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    at = per_epoch + 1  # the signal arrived in the first step of epoch 1; the ranks stopped after it
    assert (stopped["step"]["opt_step"], stopped["epoch"], stopped["epoch_step"]) == (at, 1, 2)  # mid-epoch
    assert stopped["layout"] == {"world_size": 2, "batch_size": 4, "accum_steps": 2, "global_batch": 16,
                                 "epoch_samples": 16, "samples": 16 * at}
    shutil.copytree(tmp_path / "cut", tmp_path / "cut4")
    for world, accum, out in ((1, 4, "cut"), (4, 1, "cut4")):
        resumed = _run_ranks(world, free_port(), cfg_yaml, args(tmp_path / out), tmp_path / f"rec-{out}-resumed")
        assert all(r["accum"] == accum and r["batch"] == 4 and r["code"] == 0 for r in resumed)
        assert resumed[0]["steps"] == full[0]["steps"] == 3 * per_epoch
        assert resumed[0]["lr"] == pytest.approx(full[0]["lr"], rel=1e-9, abs=0)
        got = {**{s: v for s, v in _by_step(cut).items() if s < at}, **_by_step(resumed)}
        assert got == ref, f"{world} rank(s): the optimiser steps read other images than the uninterrupted run"
        epoch1 = [p for s in range(per_epoch, 2 * per_epoch) for p in got[s]]
        assert len(epoch1) == len(set(epoch1)) == 16 * per_epoch  # the interrupted epoch: each image once
        ck = load_checkpoint(tmp_path / out / "checkpoints" / "last.pt")
        assert ck["layout"]["world_size"] == world and ck["layout"]["global_batch"] == 16
        assert ck["step"]["opt_step"] == 3 * per_epoch and ck["step"]["micro_step"] == 3 * per_epoch * accum
        assert _steps(tmp_path / out) == _steps(tmp_path / "full")  # the logged steps: one run, no gap


def test_resume_layout_keeps_the_global_batch_or_refuses_naming_both_world_sizes():
    from fasttrain.train.loop import Layout, ResumeLayoutError, resume_layout
    old = Layout(2, 4, 1)  # global batch 8
    assert resume_layout(old, 2, 4, 1, rebatch=False) == old
    assert resume_layout(old, 1, 4, 1, rebatch=False) == Layout(1, 4, 2)  # accum_steps takes the slack
    assert resume_layout(old, 1, 4, 7, rebatch=False) == Layout(1, 4, 2)  # whatever accum the command line says
    assert resume_layout(old, 4, 4, 1, rebatch=True) == Layout(4, 2, 1)  # the per-rank batch, where allowed
    assert resume_layout(old, 1, 3, 1, rebatch=True) == Layout(1, 2, 4)  # the largest batch <= 3 dividing 8
    with pytest.raises(ResumeLayoutError, match=r"last\.pt was written by 2 rank\(s\) x 4 images x accum 1 = global "
                       r"batch 8; on 4 rank\(s\) with data.batch_size=4 .*run on 1 or 2 rank\(s\).*divisor of 2.*"
                       r"resume_rebatch=true"):
        resume_layout(old, 4, 4, 1, rebatch=False, path="RUN/checkpoints/last.pt")
    with pytest.raises(ResumeLayoutError, match=r"on 3 rank\(s\).*run on 1 or 2 rank\(s\); or start a new run"):
        resume_layout(old, 3, 4, 1, rebatch=True)  # 8 images never split evenly over 3 ranks


def test_resume_onto_an_unreachable_global_batch_is_refused_before_any_work(cfg_yaml, packed, tmp_path, caplog):
    """A checkpoint written by 2 ranks x 4 images (global batch 8) resumed on 1 rank with
    data.batch_size=3: refused before the model or a loader is built; with run.resume_rebatch it
    continues as 1 rank x 2 images x accum 4, and says so."""
    out = tmp_path / "run"
    _trainer(cfg_yaml, packed, out, "--run.max_steps=2", "--run.ckpt_every=0").fit()
    last = out / "checkpoints" / "last.pt"
    ck = load_checkpoint(last)
    ck.pop("checksum")
    ck["layout"].update(world_size=2, global_batch=8, epoch_samples=16, samples=16)
    ck["rng"] = ck["rng"] * 2
    ckpt_io.save_atomic(ck, last)
    before = last.stat().st_mtime_ns
    from fasttrain.train import loop
    with pytest.raises(loop.ResumeLayoutError, match=r"written by 2 rank\(s\) .* global batch 8; on 1 rank\(s\) "
                       r"with data.batch_size=3"):
        _trainer(cfg_yaml, packed, out, "--data.batch_size=3", "--run.max_steps=4", resume="auto")
    assert last.stat().st_mtime_ns == before and _steps(out) == [1, 2]
    caplog.set_level("INFO", logger="fasttrain.train")
    tr = _trainer(cfg_yaml, packed, out, "--data.batch_size=3", "--run.max_steps=4", "--run.resume_rebatch=true",
                  resume="auto")
    assert (tr.cfg.data.batch_size, tr.accum, tr.eff_batch, tr.epoch_step) == (2, 4, 8, 8)
    assert "data.batch_size 3 -> 2, optim.accum_steps 1 -> 4" in caplog.text
    assert "RNG re-derived from (seed 0, step 2, rank)" in caplog.text
    tr.fit()
    ck = load_checkpoint(last)
    assert ck["step"]["opt_step"] == 4 and ck["layout"]["batch_size"] == 2 and ck["layout"]["accum_steps"] == 4
