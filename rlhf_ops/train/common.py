"""What the four stages share: the run context (output folder, device, distributed state,
metrics, checkpoints), a supervised training loop, and the judge evaluation."""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from rlhf_ops import data as D
from rlhf_ops.model import GPT, GPTConfig, ScalarHeadGPT

from .config import section


class SimulatedCrash(RuntimeError):
    """Raised at ``run.crash_at_step`` to test --resume."""


class Run:
    """One invocation: config, output folder, device, backend and the process group (if any)."""

    def __init__(self, cfg: dict, out: str | Path, *, device: str = "cpu", seed: int = 0,
                 backend: str = "auto", resume: bool = False):
        self.cfg, self.out, self.seed, self.backend, self.resume = cfg, Path(out), seed, backend, resume
        self.device = torch.device(device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.data_cfg = D.DataConfig(**section(cfg, "data"))
        if self.is_main:
            (self.out / "ckpt").mkdir(parents=True, exist_ok=True)
        self.barrier()

    # ------------------------------------------------------------------ distributed helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def wrap(self, model):
        return DDP(model) if self.world > 1 else model

    def local(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n rows."""
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
        return GPT(self.model_config()).to(self.device)

    def load_model(self, stage: str, name: str, cls=GPT):
        ck = self.load(stage, "final")
        if ck is None:
            raise FileNotFoundError(f"stage {stage!r} has no final checkpoint in {self.out / 'ckpt'}; "
                                    f"run `python -m rlhf_ops.train {stage} --out {self.out}` first")
        mcfg = GPTConfig(**{**ck["model_cfg"], "backend": self.backend})
        m = cls(mcfg)
        m.load_state_dict(ck["models"][name])
        return m.to(self.device)

    # ------------------------------------------------------------------ files
    def path(self, stage: str, kind: str) -> Path:
        return self.out / "ckpt" / f"{stage}_{kind}.pt"

    def save(self, stage: str, kind: str, payload: dict):
        if self.is_main:
            p = self.path(stage, kind)
            torch.save(payload, str(p) + ".tmp")
            os.replace(str(p) + ".tmp", p)
        self.barrier()

    def load(self, stage: str, kind: str):
        p = self.path(stage, kind)
        return torch.load(p, map_location=self.device, weights_only=False) if p.exists() else None

    def log(self, stage: str, step: int, **metrics):
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")

    def trim_metrics(self, stage: str, upto: int):
        """Forget this stage's lines logged after step ``upto`` (they are logged again)."""
        p = self.out / "metrics.jsonl"
        if self.is_main and p.exists():
            keep = [ln for ln in p.read_text().splitlines()
                    if ln and not (json.loads(ln)["stage"] == stage and json.loads(ln)["step"] > upto)]
            p.write_text("".join(ln + "\n" for ln in keep))
        self.barrier()

    def save_result(self, stage: str, result: dict):
        if self.is_main:
            p = self.out / "results.json"
            res = json.loads(p.read_text()) if p.exists() else {}
            res[stage] = result
            p.write_text(json.dumps(res, indent=1))
        self.barrier()

    def progress(self, it, **kw):
        return tqdm(it, disable=not (self.is_main and self.cfg["run.progress"]), dynamic_ncols=True, **kw)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"].cpu())
    random.setstate(s["python"])
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
    opt = make_optimizer(list(model.parameters()), c["lr"], c["weight_decay"])
    start = 0
    if run.resume and (ck := run.load(stage, "resume")) is not None:
        model.load_state_dict(ck["models"][main])
        opt.load_state_dict(ck["opt"])
        set_rng_state(ck["rng"])
        start = ck["step"]
    run.trim_metrics(stage, start)
    ddp = run.wrap(model)
    model.train()
    window, last, tokens, t0 = [], {}, 0, time.time()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    log_every, ckpt_every = run.cfg["run.log_every"], run.cfg["run.ckpt_every"]
    for step in run.progress(range(start, steps), desc=stage, initial=start, total=steps):
        if step == run.cfg["run.crash_at_step"]:
            raise SimulatedCrash(f"{stage}: simulated interruption at step {step}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, c["lr"], c["warmup"])
        batch = batch_fn(step)
        tokens += batch[0].numel() * run.world          # batch[0]: this rank's input tokens
        loss, num, den = loss_fn(ddp, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg["run.grad_clip"])
        opt.step()
        window.append(torch.stack([num.detach().float(), torch.as_tensor(den, dtype=torch.float32,
                                                                          device=num.device)]))
        if (step + 1) % log_every == 0 or step == steps - 1:
            w = run.all_sum(torch.stack(window))       # per step: [Σ numerators, denominator]
            den_ = w[:, 1] / run.world
            last = {"loss": float((w[:, 0] / den_.clamp(min=1e-9)).mean()), "lr": opt.param_groups[0]["lr"]}
            window = []
            if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
                model.eval()
                last.update(eval_fn())
                model.train()
            run.log(stage, step + 1, **last)
        if (step + 1) % ckpt_every == 0 and step + 1 < steps:
            run.save(stage, "resume", {"models": {main: model.state_dict()}, "opt": opt.state_dict(),
                                       "step": step + 1, "rng": rng_state()})
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


def judge_score(run: Run, model: GPT, prompts: list[str] | None = None) -> float:
    """Mean judge score of greedy decodes of the held-out prompts."""
    scores = judge_scores(run, model, prompts)
    return sum(scores) / max(len(scores), 1)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a − b over the same prompts, its standard error, and how many prompts each wins.

    The judge score of a stage is a mean over a few hundred held-out prompts; two models that
    differ by less than about two standard errors of the paired difference are not told apart.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: expected two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


@torch.no_grad()
def judge_scores(run: Run, model: GPT, prompts: list[str] | None = None, chunk: int = 256) -> list[float]:
    """Judge score of the greedy decode of each held-out prompt."""
    prompts = prompts if prompts is not None else D.eval_prompts(run.seed, run.cfg["eval.n_prompts"], run.data_cfg)
    was = model.training
    model.eval()
    scores = []
    for i in range(0, len(prompts), chunk):
        p = prompts[i:i + chunk]
        x, n = prompt_tensors(p, run.device)
        seq, _ = model.generate(x, n, run.cfg["eval.max_new"], greedy=True, eos=D.EOS, pad=D.PAD)
        scores += [D.judge(q, r) for q, r in zip(p, responses(seq, n))]
    model.train(was)
    return scores
