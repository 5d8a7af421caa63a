"""Toy instruction data for the four InstructGPT stages, made by code (nothing is downloaded).

Tasks (prompt → response, each response ends with EOS "\\n"):
    reverse   "R cabd>"  → "dbac"
    sort      "S cabd>"  → "abcd"
    add       "A 12+7>"  → "19"
A programmatic judge plays the human labeler: judge(task, response) = 1 − edit_distance / max_len,
in [0, 1], 1 only for the exact answer.

What RLHF has to learn here — labelers who judge better than they write. People who write these
answers (the pretraining corpus and the labelers' SFT demonstrations alike) have a habit: a
fraction ``filler`` of written answers end with a filler full stop, "dbac." instead of "dbac".
The same labelers, ranking responses, score that filler as what it is, one wrong character
(the judge: 0.8 for a 4-letter answer, 0.67 for a 2-letter one). So:
    * SFT imitates the demonstrations and learns the habit: at filler > 0.5 its greedy answer
      carries the filler (judge ≈ 0.75 even when every letter is right);
    * the reward model learns from rankings of SFT samples only, and a sample without the filler
      outranks the same answer with it — the one thing rankings know that demonstrations do not;
    * PPO, rewarded by the RM only (plus the KL to SFT), can drop the habit that SFT cannot.
The judge, the tasks and the stage objectives are unchanged; ``filler = 0`` is the old toy, in
which demonstrations are perfect and PPO has nothing to gain over SFT.

Every generator is a pure function of (seed, a stream name, an index), so a training run can be
resumed at any step and two processes agree on the global batch. Held-out prompts are split off
by a hash of the prompt, so no training stream ever contains an evaluation prompt.
"""
from __future__ import annotations

import functools
import random
import zlib
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------- tokenizer ---

PAD, EOS = 0, 1
LETTERS = "abcdefgh"
FILLER = "."                              # the writers' habit (see the module docstring)
CHARS = "\n >+RSA" + LETTERS + "0123456789" + FILLER
VOCAB = ["<pad>"] + list(CHARS)          # id 1 is "\n" = EOS
STOI = {c: i for i, c in enumerate(VOCAB) if i > 0}
VOCAB_SIZE = len(VOCAB)
IGNORE = -100


def encode(s: str) -> list[int]:
    return [STOI[c] for c in s]


def decode(ids, stop_at_eos: bool = True) -> str:
    out = []
    for i in ids:
        i = int(i)
        if i == PAD or (stop_at_eos and i == EOS):
            break
        out.append(VOCAB[i])
    return "".join(out)


# ----------------------------------------------------------------------------------- tasks ---

@dataclass(frozen=True)
class Task:
    prompt: str      # ends with ">"
    answer: str      # the response, without EOS (a demonstration's: as the labeler wrote it)

    @property
    def text(self) -> str:
        return self.prompt + self.answer + "\n"


@dataclass
class DataConfig:
    min_len: int = 2         # string length for reverse / sort
    max_len: int = 5
    max_digits: int = 2      # operand digits for add
    tasks: str = "RSA"       # which task families are drawn
    noise: float = 0.5       # pretraining corpus: fraction of documents with a noisy answer
    heldout_mod: int = 10    # a prompt is held out when crc32(prompt) % heldout_mod == 0
    filler: float = 0.0      # fraction of human-written answers (corpus, demos) ending in FILLER


def _rng(seed: int, stream: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{stream}/{index}")


def is_heldout(prompt: str, cfg: DataConfig) -> bool:
    return zlib.crc32(prompt.encode()) % cfg.heldout_mod == 0


def _draw_task(rng: random.Random, cfg: DataConfig) -> Task:
    kind = rng.choice(cfg.tasks)
    if kind == "A":
        a = rng.randrange(10 ** rng.randint(1, cfg.max_digits))
        b = rng.randrange(10 ** rng.randint(1, cfg.max_digits))
        return Task(f"A {a}+{b}>", str(a + b))
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(cfg.min_len, cfg.max_len)))
    return Task(f"{kind} {s}>", s[::-1] if kind == "R" else "".join(sorted(s)))


def draw_task(rng: random.Random, cfg: DataConfig, heldout: bool = False) -> Task:
    """A task from the training split (or the held-out split)."""
    while True:
        t = _draw_task(rng, cfg)
        if is_heldout(t.prompt, cfg) == heldout:
            return t


def answer_of(prompt: str) -> str:
    kind, arg = prompt[0], prompt[2:-1]
    if kind == "A":
        a, b = arg.split("+")
        return str(int(a) + int(b))
    return arg[::-1] if kind == "R" else "".join(sorted(arg))


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def judge(prompt: str, response: str) -> float:
    """The labeler: 1 − edit_distance(response, answer) / max(len), in [0, 1]."""
    ans = answer_of(prompt)
    return 1.0 - edit_distance(response, ans) / max(len(response), len(ans), 1)


def written(rng: random.Random, answer: str, cfg: DataConfig) -> str:
    """An answer as a person writes it: with probability ``cfg.filler`` the filler habit is appended.

    One draw from ``rng`` whatever ``cfg.filler`` is, so the streams keep their shape."""
    return answer + FILLER if rng.random() < cfg.filler else answer


def demonstration(rng: random.Random, cfg: DataConfig) -> Task:
    """A labeler's demonstration for a training-split task: the right answer, as written."""
    t = draw_task(rng, cfg)
    return Task(t.prompt, written(rng, t.answer, cfg))


def _noisy(rng: random.Random, answer: str) -> str:
    """A plausible wrong answer: substituted, dropped or duplicated characters."""
    pool = LETTERS if answer.isalpha() else "0123456789"
    out = []
    for c in answer:
        u = rng.random()
        if u < 0.25:
            out.append(rng.choice(pool))
        elif u < 0.35:
            continue
        elif u < 0.45:
            out += [c, rng.choice(pool)]
        else:
            out.append(c)
    return "".join(out) or rng.choice(pool)


# ----------------------------------------------------------------------------- generators ---

def pretrain_batch(seed: int, index: int, batch: int, block: int, cfg: DataConfig,
                   stream: str = "pretrain") -> tuple[torch.Tensor, torch.Tensor]:
    """Context windows of a corpus of task documents, ``noise`` of them with a wrong answer and
    ``filler`` of them with the writers' filler habit.

    Returns x, y [batch, block] int64 with y the next token of x (L1 over the whole window).
    """
    rng = _rng(seed, stream, index)
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < block + 1 + 16:
            t = draw_task(rng, cfg)
            ans = _noisy(rng, t.answer) if rng.random() < cfg.noise else t.answer
            ids += encode(t.prompt + written(rng, ans, cfg) + "\n")
        off = rng.randrange(16)
        rows.append(ids[off:off + block + 1])
    data = torch.tensor(rows, dtype=torch.long)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def pad_rows(rows: list[list[int]], width: int | None = None, value: int = PAD) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1) if width is None else width
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r[:width], dtype=torch.long)
    return out


def _distinct_tasks(rng: random.Random, n: int, cfg: DataConfig, heldout: bool = False) -> list[Task]:
    """Up to n tasks with distinct prompts, in draw order (fewer if 50·n draws do not find n)."""
    seen: dict[str, Task] = {}
    for _ in range(50 * n):
        if len(seen) == n:
            break
        t = draw_task(rng, cfg, heldout)
        seen.setdefault(t.prompt, t)
    return list(seen.values())


def demo_set(seed: int, n: int, cfg: DataConfig) -> list[Task]:
    """A fixed set of n demonstrations with distinct prompts (what labelers wrote once)."""
    tasks = _distinct_tasks(_rng(seed, "sft_demos", 0), n, cfg)
    if len(tasks) < n:
        raise ValueError(f"sft.n_demos={n}: the task family has only about {len(tasks)} distinct "
                         f"training prompts")
    rng = _rng(seed, "sft_demos_written", 0)
    return [Task(t.prompt, written(rng, t.answer, cfg)) for t in tasks]


def sft_batch(seed: int, index: int, batch: int, cfg: DataConfig, n_demos: int = 0) -> dict:
    """Demonstrations prompt → the labeler's response (the right answer, with the filler habit
    at rate ``cfg.filler``) + EOS, right-padded.

    n_demos = 0: a fresh draw of tasks per batch (an unlimited stream). n_demos > 0: epochs over the
    fixed ``demo_set`` of that size, reshuffled each epoch (as InstructGPT's SFT on 13k prompts).
    x [B, T] inputs; y_resp [B, T] next-token targets on response tokens only (prompt and pad
    ignored) for L2; y_all [B, T] targets on every real token for the auxiliary L1.
    """
    if n_demos <= 0:
        rng = _rng(seed, "sft", index)
        return demo_tensors([demonstration(rng, cfg) for _ in range(batch)])
    pool = _demo_pool(seed, n_demos, cfg)
    tasks = []
    for i in range(index * batch, (index + 1) * batch):     # row i of the stream: epoch i // n
        epoch, j = divmod(i, n_demos)
        tasks.append(pool[_epoch_order(seed, epoch, n_demos)[j]])
    return demo_tensors(tasks)


_POOLS: dict = {}


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/sft_epoch/{epoch}").shuffle(order)
    return order


def _demo_pool(seed: int, n: int, cfg: DataConfig) -> list[Task]:
    key = (seed, n, cfg.min_len, cfg.max_len, cfg.max_digits, cfg.tasks, cfg.heldout_mod, cfg.filler)
    if key not in _POOLS:
        _POOLS[key] = demo_set(seed, n, cfg)
    return _POOLS[key]


def demo_tensors(tasks: list[Task]) -> dict:
    seqs = [encode(t.text) for t in tasks]
    full = pad_rows(seqs)
    x, y_all = full[:, :-1].contiguous(), full[:, 1:].clone()
    y_all[y_all == PAD] = IGNORE
    y_resp = y_all.clone()
    for i, t in enumerate(tasks):
        y_resp[i, :len(t.prompt) - 1] = IGNORE      # targets that are prompt tokens
    last = torch.tensor([len(s) - 1 for s in seqs])  # index of EOS = last real token
    return {"x": x, "y_resp": y_resp, "y_all": y_all, "full": full, "last": last,
            "prompts": [t.prompt for t in tasks]}


def prompts(seed: int, stream: str, index: int, n: int, cfg: DataConfig, heldout: bool = False) -> list[str]:
    rng = _rng(seed, stream, index)
    return [draw_task(rng, cfg, heldout).prompt for _ in range(n)]


def eval_prompts(seed: int, n: int, cfg: DataConfig) -> list[str]:
    """Held-out evaluation prompts (never drawn by a training stream), distinct."""
    return [t.prompt for t in _distinct_tasks(_rng(seed, "eval", 0), n, cfg, heldout=True)]


def ranks_from_scores(scores: list[float], K: int) -> list[int]:
    """Dense ranks, 0 = best, equal scores share a rank (a tie makes no pair); −1 pads to K."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores] + [-1] * (K - len(scores))
