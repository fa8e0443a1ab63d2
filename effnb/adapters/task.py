"""The built-in offline fine-tuning task ("python-api"), user text, and batching.

Question/answer pairs are built deterministically from the Python standard library's own
documentation: for each public function of ``effnb.data.RETRIEVAL_MODULES``,

    Q: What does json.dumps do?
    A: Serialize ``obj`` to a JSON formatted ``str``.

(the answer is the first sentence of the docstring). One pair in five (chosen by a hash of the
function name, so the split does not move when a module gains functions) is held out. Training
examples are packed into sequences of ``seq_len`` tokens; the loss counts answer tokens only, so
the held-out loss measures how well the model answers questions about functions it never saw.

User text (a string, a file path, a list of texts) is trained on as plain language modelling,
with the last tenth held out.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

TASK_NAME = "python-api"
HELD_OUT_EVERY = 5  # one pair in five is held out


@dataclass
class Task:
    """Token streams ready to pack: each example is (input ids, loss mask) with the mask on answer tokens."""

    name: str
    train: list[tuple[list[int], list[bool]]]
    held_out: list[tuple[list[int], list[bool]]]
    questions: list[tuple[str, str]]  # held-out (prompt, reference answer) for before/after generations
    description: str

    def describe(self) -> dict:
        return {"name": self.name, "train_examples": len(self.train), "held_out_examples": len(self.held_out),
                "train_tokens": sum(len(i) for i, _ in self.train),
                "held_out_tokens": sum(len(i) for i, _ in self.held_out), "description": self.description}


def _first_sentence(doc: str) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if re.match(r"^[\w.]+\(.*\)( -> .*)?$", para):  # a builtin's signature line, not prose
        return None
    sentence = re.split(r"(?<=[.!?])\s", para)[0].strip()
    return sentence if len(sentence) >= 20 else None


@functools.cache
def qa_pairs() -> tuple[tuple[str, str], ...]:
    """(qualified function name, first docstring sentence), sorted, answers unique."""
    from .. import data

    return tuple(sorted(data.function_summaries(_first_sentence)))


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def question(name: str) -> str:
    return f"Q: What does {name} do?\nA:"


def _eos(tok) -> list[int]:
    eos = getattr(tok, "eos_token_id", None)
    return [eos] if eos is not None else []


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def python_api_task(tok) -> Task:
    train, held, questions = [], [], []
    for name, answer in qa_pairs():
        q = _ids(tok, question(name))
        a = _ids(tok, " " + answer) + _eos(tok)
        example = (q + a, [False] * len(q) + [True] * len(a))
        if is_held_out(name):
            held.append(example)
            questions.append((question(name), answer))
        else:
            train.append(example)
    return Task(TASK_NAME, train, held, questions,
                "questions about Python standard-library functions, answered with the first sentence of their "
                f"docstring; {len(train)} train / {len(held)} held-out functions")


def text_task(tok, text: str) -> Task:
    ids = _ids(tok, text)
    if not ids:
        raise ValueError("the training data yields no tokens: give a non-empty text, file or list of texts")
    cut = max(1, int(len(ids) * 0.9))
    train, held = ids[:cut], ids[cut:] or ids[-max(2, len(ids) // 10):]
    return Task("text", [(train, [True] * len(train))], [(held, [True] * len(held))], [],
                f"user text, {len(ids)} tokens; the last tenth held out")


def build_task(tok, data) -> Task:
    """The task for ``data``: 'python-api', or user text (string, file path, list of strings)."""
    from .. import data as _data

    if isinstance(data, str) and data == TASK_NAME:
        task = python_api_task(tok)
    else:
        if isinstance(data, (list, tuple)) and not any(isinstance(t, str) and t.strip() for t in data):
            raise ValueError("the training data yields no tokens: the list of texts is empty")
        if isinstance(data, str) and not data.strip():
            raise ValueError("the training data yields no tokens: data is an empty string")
        # a missing file is FileNotFoundError, a directory or non-UTF-8 file ValueError, never the path as text
        task = text_task(tok, _data.resolve_text(data, name="data"))
    if not task.train or not any(any(m) for _, m in task.train):
        raise ValueError(f"the training data ({task.name}) yields no tokens to train on")
    return task


def pack(examples, seq_len: int, pad_id: int):
    """Concatenate examples into rows of ``seq_len`` tokens.

    Returns (input_ids [R, seq_len], labels [R, seq_len]) with label -100 where the loss must not
    count (questions, padding). A row is left-shifted by the model, so labels equal inputs there.
    """
    import torch

    ids: list[int] = []
    mask: list[bool] = []
    for i, m in examples:
        ids += i
        mask += m
    rows = max(1, -(-len(ids) // seq_len))
    pad = rows * seq_len - len(ids)
    ids += [pad_id] * pad
    mask += [False] * pad
    x = torch.tensor(ids, dtype=torch.long).view(rows, seq_len)
    keep = torch.tensor(mask, dtype=torch.bool).view(rows, seq_len)
    y = torch.where(keep, x, torch.full_like(x, -100))
    return x, y


def batches(task: Task, seq_len: int, batch_size: int, steps: int, seed: int, pad_id: int):
    """``steps`` batches of packed training rows; examples reshuffled every epoch (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows_x, rows_y = None, None
    epoch = 0
    out = []
    while len(out) < steps:
        if task.name == "text":
            x, y = pack(task.train, seq_len, pad_id)
        else:
            order = torch.randperm(len(task.train), generator=gen).tolist()
            x, y = pack([task.train[i] for i in order], seq_len, pad_id)
        perm = torch.randperm(x.shape[0], generator=gen)
        rows_x, rows_y = x[perm], y[perm]
        for i in range(0, rows_x.shape[0] - batch_size + 1 if rows_x.shape[0] >= batch_size else 1, batch_size):
            out.append((rows_x[i:i + batch_size], rows_y[i:i + batch_size]))
            if len(out) == steps:
                break
        epoch += 1
    return out
