"""What the four stages share: the run context (output folder, device, distributed state,
metrics, checkpoints), a supervised training loop, and the judge evaluation."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import random
import signal
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import data as D
from .model import GPT, GPTConfig

from .config import section


class SimulatedCrash(RuntimeError):
    """Raised at ``run.crash_at_step`` to test --resume."""


class CheckpointError(RuntimeError):
    """A checkpoint (or the RM comparison file) is truncated or corrupt: it is never loaded."""


# ------------------------------------------------------------------------- files on disk ---
# A kill -9 may strike at any instruction. Every file the loop reads back is therefore written
# to a temporary name, flushed to disk (fsync) and renamed over the old one (rename is atomic):
# a reader sees the old file or the new one, never half of one. Checkpoints carry a sha256
# sidecar ("<name>.sha256") so that a file damaged in any other way is refused, not loaded.

def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:                                  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes, die_halfway: bool = False):
    """Write data to path and fsync it. ``die_halfway``: testing only, SIGKILL this process once
    half the bytes are on disk (what a kill during a checkpoint write leaves behind)."""
    with open(path, "wb") as f:
        if die_halfway:
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes):
    """path ← data via path.tmp + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, payload: dict, *, die_halfway: bool = False):
    """torch.save(payload) with a sha256 sidecar, both written atomically.

    Order: data to ``X.tmp``, digest to ``X.sha256.tmp``, rename the data, rename the digest. A
    kill between the two renames leaves the new data with the old digest and the new digest in
    ``X.sha256.tmp``: ``load_checkpoint`` finishes that commit instead of calling it corrupt."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    side = path.with_name(path.name + ".sha256")
    tmp, side_tmp = path.with_name(path.name + ".tmp"), side.with_name(side.name + ".tmp")
    _write_synced(tmp, data, die_halfway)
    _write_synced(side_tmp, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    _fsync_dir(path.parent)


def _digest_in(p: Path) -> str | None:
    try:
        return p.read_text().split()[0]
    except (OSError, IndexError):
        return None


def load_checkpoint(path: Path, map_location=None):
    """The payload of a checkpoint written by ``save_checkpoint`` (None if there is none), loaded
    with ``torch.load(weights_only=True)`` after its sha256 matches its sidecar."""
    path = Path(path)
    if not path.exists():
        return None
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    side = path.with_name(path.name + ".sha256")
    if _digest_in(side) != digest:
        pending = side.with_name(side.name + ".tmp")
        if _digest_in(pending) == digest:           # killed between the two renames of a save
            os.replace(pending, side)
        else:
            want = _digest_in(side)
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt: its sha256 {digest[:16]}… does not match "
                + (f"{side.name} ({want[:16]}…)" if want else f"a sidecar ({side.name} is missing)")
                + "; it was not loaded. Delete it and its .sha256 to redo that part of the run.")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a digest-valid file that still does not load
        raise CheckpointError(f"checkpoint {path} does not load with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def write_text_atomic(path: Path, text: str):
    write_atomic(Path(path), text.encode())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a kill (the last one) is skipped."""
    out = []
    if Path(path).exists():
        for ln in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                continue
    return out


class Run:
    """One invocation: config, output folder, device, backend and the process group (if any)."""

    def __init__(self, cfg: dict, out: str | Path, *, device: str = "cpu", seed: int = 0,
                 backend: str = "auto", resume: bool = False):
        self.cfg, self.out, self.seed, self.backend, self.resume = cfg, Path(out), seed, backend, resume
        self.device = torch.device(device)
        self.procs = dist.get_world_size() if dist.is_initialized() else 1
        self.global_rank = dist.get_rank() if dist.is_initialized() else 0
        # world/rank: data parallelism (DDP over the batch). model.vocab_parallel splits the LM
        # head's vocabulary over the processes instead, which needs the same batch on every rank
        # (the sharded loss combines per-row statistics of one row across ranks): then every
        # process is data-parallel rank 0 of 1, holds the whole model and the whole batch, and the
        # loss's collectives keep the replicas equal (GPT.forward).
        vp = bool(cfg.get("model.vocab_parallel", False))
        self.world = 1 if vp else self.procs
        self.rank = 0 if vp else self.global_rank
        # model.context_parallel: every rank holds the whole batch and the model splits each
        # sequence over the ranks (GPT._cp_lm_loss); the ranks stay data-parallel for the
        # gradients (DDP averages their shares). run.fsdp: FSDP2's fully_shard instead of DDP.
        self.cp = bool(cfg.get("model.context_parallel", False))
        self.fsdp = bool(cfg.get("run.fsdp", False))
        if vp and (self.cp or self.fsdp):
            raise ValueError("model.vocab_parallel (every rank the same rows, no data parallelism) "
                             "cannot be combined with model.context_parallel or run.fsdp")
        dtypes = {"float32": torch.float32, "float64": torch.float64}
        if cfg.get("run.dtype", "float32") not in dtypes:
            raise ValueError(f"run.dtype must be 'float32' or 'float64', got {cfg['run.dtype']!r}")
        self.dtype = dtypes[cfg.get("run.dtype", "float32")]
        self.data_cfg = D.DataConfig(**section(cfg, "data"))
        self.stage_info: dict = {}          # config, args of the command running a stage
        self._saves = 0
        if self.is_main:
            (self.out / "ckpt").mkdir(parents=True, exist_ok=True)
        self.barrier()

    def start_stage(self, stage: str, info: dict | None = None):
        """Called before a stage runs: seeds torch's global generator from (seed, stage), so a stage
        draws the same numbers whether the earlier stages ran in this process or in another one
        (resume); starts the stage's clock; ``info`` (config, args) goes into its results."""
        torch.manual_seed(zlib.crc32(f"{self.seed}/{stage}".encode()))
        self.stage_info = dict(info or {})
        self._t0, self._prior = time.time(), 0.0
        self._c0, self._prior_cpu = time.process_time(), 0.0

    def resumed_from(self, ck: dict):
        """A resume checkpoint was loaded: the seconds spent before it count towards the stage."""
        self._prior, self._prior_cpu = float(ck.get("seconds", 0.0)), float(ck.get("cpu_seconds", 0.0))

    def elapsed(self) -> float:
        """Wall seconds spent on the current stage, over every invocation that worked on it."""
        return self._prior + time.time() - self._t0

    def elapsed_cpu(self) -> float:
        """CPU seconds of this process on the current stage (over every invocation): with one
        thread, what the wall time would be on a core nobody else uses."""
        return self._prior_cpu + time.process_time() - self._c0

    # ------------------------------------------------------------------ distributed helpers
    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def barrier(self):
        if self.procs > 1:
            dist.barrier()

    def wrap(self, model):
        if self.fsdp:
            raise ValueError("run.fsdp applies to the supervised stages (pretrain, sft, rm: "
                             "train.run.fit); this stage wraps its models with DDP: unset run.fsdp")
        return DDP(model) if self.world > 1 else model

    def trainable(self, model):
        """(the module the optimizer updates, the module to call): ``model`` and DDP(model) (model
        itself on one rank); with run.fsdp a copy of ``model`` wrapped by FSDP2's fully_shard
        (every block, then the whole) over the ranks — the stage keeps its plain model for
        evaluation and checkpoints, and ``sync_back`` copies the trained parameters into it."""
        if not self.fsdp:
            return model, self.wrap(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(self.device.type, (self.procs,))
        sharded = copy.deepcopy(model)
        for block in sharded.trunk.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        return sharded, sharded

    def sync_back(self, model, trained):
        """Copy the parameters of ``trained`` (run.fsdp: the sharded copy) into ``model``."""
        if trained is not model:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            model.load_state_dict(get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True)))

    def optimizer_state(self, trained, opt) -> dict:
        if not self.fsdp:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(trained, opt, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))

    def load_optimizer(self, trained, opt, state: dict):
        if not self.fsdp:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(trained, opt, state, options=StateDictOptions(full_state_dict=True))

    def local(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n rows (all of them under
        model.context_parallel: the ranks split the sequences instead)."""
        if self.cp:
            return slice(0, n)
        if n % self.world:
            raise ValueError(f"global batch {n} is not divisible by the world size {self.world}")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    # ------------------------------------------------------------------ model construction
    def model_config(self) -> GPTConfig:
        m = section(self.cfg, "model")
        return GPTConfig(vocab_size=D.VOCAB_SIZE, backend=self.backend, **m)

    def new_lm(self) -> GPT:
        return GPT(self.model_config()).to(self.device, self.dtype)

    def load_model(self, stage: str, name: str, cls=GPT):
        ck = self.load(stage, "final")
        if ck is None:
            raise FileNotFoundError(f"stage {stage!r} has no final checkpoint in {self.out / 'ckpt'}; "
                                    f"run `python -m rlhf_ops.train {stage} --out {self.out}` first")
        mcfg = GPTConfig(**{**ck["model_cfg"], "backend": self.backend,     # how to run: this run's
                             "vocab_parallel": self.cfg["model.vocab_parallel"],
                             "context_parallel": self.cfg["model.context_parallel"]})
        m = cls(mcfg)
        m.load_state_dict(ck["models"][name])
        return m.to(self.device, self.dtype)

    # ------------------------------------------------------------------ files
    def path(self, stage: str, kind: str) -> Path:
        return self.out / "ckpt" / f"{stage}_{kind}.pt"

    def save(self, stage: str, kind: str, payload: dict):
        """Checkpoint (atomic, sha256 sidecar; see ``save_checkpoint``)."""
        if self.is_main:
            self._saves += 1
            save_checkpoint(self.path(stage, kind), payload,
                            die_halfway=self._saves == self.cfg["run.die_in_save"])
        self.barrier()

    def load(self, stage: str, kind: str):
        return load_checkpoint(self.path(stage, kind), map_location=self.device)

    def remove(self, *names: tuple[str, str]):
        """Delete checkpoints (stage, kind) that a committed stage no longer needs."""
        if self.is_main:
            for stage, kind in names:
                p = self.path(stage, kind)
                for q in (p, p.with_name(p.name + ".sha256")):
                    q.unlink(missing_ok=True)
        self.barrier()

    def finished(self, stage: str) -> bool:
        """The stage's final checkpoint exists and is intact (a corrupt one raises CheckpointError)."""
        return self.load(stage, "final") is not None

    def log(self, stage: str, step: int, **metrics):
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")

    def trim_metrics(self, stage: str, upto: int):
        """Forget this stage's lines logged after step ``upto`` (they are logged again), and any
        line a kill cut short. Every stage calls this before it logs anything."""
        p = self.out / "metrics.jsonl"
        if self.is_main and p.exists():
            keep = [r for r in read_jsonl(p) if not (r.get("stage") == stage and r.get("step", 0) > upto)]
            write_text_atomic(p, "".join(json.dumps(r) + "\n" for r in keep))
        self.barrier()

    def save_result(self, stage: str, result: dict, record: bool = True):
        """results.json[stage] ← result, with the config and args of this command (``record``)."""
        if self.is_main:
            p = self.out / "results.json"
            res = json.loads(p.read_text()) if p.exists() else {}
            rec = {"config": self.stage_info.get("config"), "args": self.stage_info.get("args"),
                   "seconds": self.elapsed(), "cpu_seconds": self.elapsed_cpu()} if record else {}
            res[stage] = {**result, **{k: v for k, v in rec.items() if v is not None}}
            write_text_atomic(p, json.dumps(res, indent=1))
        self.barrier()

    def progress(self, it=None, **kw):
        """A tqdm bar on the main process when ``run.progress`` is on (a silent one otherwise)."""
        return tqdm(it, disable=not (self.is_main and self.cfg["run.progress"]), dynamic_ncols=True, **kw)


def rng_state() -> dict:
    """Generator states as tensors and plain lists (a checkpoint loads with weights_only=True)."""
    v, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [v, list(state), gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"].cpu())
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params, lr: float, weight_decay: float):
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    rest = [p for p in params if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def fit(run: Run, stage: str, models: dict, main: str, batch_fn, loss_fn, *, eval_fn=None,
        eval_every: int = 0) -> dict:
    """The supervised loop shared by pretrain, SFT and RM.

    ``batch_fn(step)`` → the global batch of that step (a pure function of the step, so a resumed
    run sees the same data); ``loss_fn(model, batch)`` → (loss to backpropagate on this rank,
    global numerator on this rank, global denominator): the loss is numerator/denominator·world so
    that DDP's gradient average equals the gradient of the global mean.
    Returns {"final_loss", "history"}.
    """
    c = section(run.cfg, stage)
    model = models[main]
    steps = c["steps"]
    start, window, ck = 0, [], None
    if run.resume and (ck := run.load(stage, "resume")) is not None:
        model.load_state_dict(ck["models"][main])
        set_rng_state(ck["rng"])
        start, window = ck["step"], list(ck["window"])
        run.resumed_from(ck)
    trained, ddp = run.trainable(model)      # before the optimizer: fully_shard replaces parameters
    opt = make_optimizer(list(trained.parameters()), c["lr"], c["weight_decay"])
    if ck is not None:
        run.load_optimizer(trained, opt, ck["opt"])
    run.trim_metrics(stage, start)
    trained.train()
    last, tokens, t0 = {}, 0, time.time()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    log_every, ckpt_every = run.cfg["run.log_every"], run.cfg["run.ckpt_every"]
    for step in run.progress(range(start, steps), desc=stage, initial=start, total=steps):
        if step == run.cfg["run.crash_at_step"]:
            raise SimulatedCrash(f"{stage}: simulated interruption at step {step}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, c["lr"], c["warmup"])
        batch = batch_fn(step)
        tokens += batch[0].numel() * (1 if run.cp else run.world)   # batch[0]: this rank's input
        loss, num, den = loss_fn(ddp, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), run.cfg["run.grad_clip"])
        opt.step()
        window.append(torch.stack([num.detach().float(), torch.as_tensor(den, dtype=torch.float32,
                                                                          device=num.device)]))
        if (step + 1) % log_every == 0 or step == steps - 1:
            w = run.all_sum(torch.stack(window))       # per step: [Σ numerators, denominator]
            den_ = w[:, 1] / run.world
            last = {"loss": float((w[:, 0] / den_.clamp(min=1e-9)).mean()), "lr": opt.param_groups[0]["lr"]}
            window = []
            if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
                run.sync_back(model, trained)
                model.eval()
                last.update(eval_fn())
                model.train()
            run.log(stage, step + 1, **last)
        if (step + 1) % ckpt_every == 0 and step + 1 < steps:
            run.sync_back(model, trained)
            run.save(stage, "resume", {"models": {main: model.state_dict()},
                                       "opt": run.optimizer_state(trained, opt),
                                       "step": step + 1, "rng": rng_state(), "window": window,
                                       "seconds": run.elapsed(), "cpu_seconds": run.elapsed_cpu()})
    run.sync_back(model, trained)
    model.eval()
    return {"final_loss": last.get("loss", float("nan")), **throughput(run, tokens, time.time() - t0)}


def throughput(run: Run, tokens: int, seconds: float) -> dict:
    """Training tokens per second of this invocation and the peak device memory (CUDA only)."""
    out = {"train_tokens_per_s": tokens / max(seconds, 1e-9)}
    if run.device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(run.device)
    return out


# ---------------------------------------------------------------------------- evaluation ---

def prompt_tensors(prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [D.encode(p) for p in prompts]
    return D.pad_rows(ids).to(device), torch.tensor([len(i) for i in ids], device=device)


def responses(seq: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    return [D.decode(seq[i, int(lengths[i]):].tolist()) for i in range(seq.shape[0])]


def judge_score(run: Run, model: GPT, prompts: list[str] | None = None, desc: str = "judge") -> float:
    """Mean judge score of greedy decodes of the held-out prompts."""
    scores = judge_scores(run, model, prompts, desc=desc)
    return sum(scores) / max(len(scores), 1)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean of xs and its standard error (sample std / √n; NaN for fewer than two)."""
    t = torch.tensor(xs, dtype=torch.float64)
    se = float(t.std(unbiased=True) / len(t) ** 0.5) if len(t) > 1 else float("nan")
    return (float(t.mean()) if len(t) else float("nan")), se


def filler_rate(responses: list[str]) -> float:
    """Fraction of responses that end with the writers' filler habit (``rlhf_ops.train.data.FILLER``)."""
    return sum(r.endswith(D.FILLER) for r in responses) / max(len(responses), 1)


@torch.no_grad()
def pretrain_loss(run: Run, model: GPT) -> float:
    """L1 of the model on ``eval.lm_windows`` fixed windows of the pretraining corpus (a stream no
    stage trains on): how far a stage has moved the model from the pretraining distribution."""
    x, y = D.pretrain_batch(run.seed, 0, run.cfg["eval.lm_windows"], run.cfg["model.block_size"],
                            run.data_cfg, stream="lm_eval")
    was = model.training
    model.eval()
    loss = float(model(x.to(run.device), y.to(run.device)))
    model.train(was)
    return loss


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a − b over the same prompts, its standard error, and how many prompts each wins.

    The judge score of a stage is a mean over a few hundred held-out prompts. A stage beats SFT
    when the paired difference is at least 3 standard errors above 0 (``report.SE_BAR``, the bar of
    ``summarize`` and the README); the report and the table print the measured margin in SEs.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: expected two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


@torch.no_grad()
def greedy_responses(run: Run, model: GPT, prompts: list[str] | None = None, chunk: int = 128,
                     desc: str = "judge") -> tuple[list[str], list[str]]:
    """(prompts, greedy responses) for the held-out prompts (or the ones given)."""
    prompts = prompts if prompts is not None else D.eval_prompts(run.seed, run.cfg["eval.n_prompts"], run.data_cfg)
    was = model.training
    model.eval()
    out = []
    with run.progress(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        for i in range(0, len(prompts), chunk):
            p = prompts[i:i + chunk]
            x, n = prompt_tensors(p, run.device)
            seq, _ = model.generate(x, n, run.cfg["eval.max_new"], greedy=True, eos=D.EOS, pad=D.PAD)
            out += responses(seq, n)
            bar.update(len(p))
    model.train(was)
    return prompts, out


def judge_scores(run: Run, model: GPT, prompts: list[str] | None = None, desc: str = "judge",
                 responses_out: list | None = None) -> list[float]:
    """Judge score of the greedy decode of each held-out prompt (``responses_out`` gets the
    responses appended when given)."""
    prompts, resp = greedy_responses(run, model, prompts, desc=desc)
    if responses_out is not None:
        responses_out += resp
    return [D.judge(q, r) for q, r in zip(prompts, resp)]
