"""Quality: perplexity for causal LMs; retrieval and embedding agreement for encoders."""

from __future__ import annotations

import math

from .. import data as _data


def token_ids(tokenizer, text: str):
    """All token ids of ``text`` as a 1-D LongTensor (no truncation, no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, text=None, *, max_tokens: int = 2048, window: int = 512, tokenizer=None) -> float:
    """Perplexity over the first ``max_tokens`` tokens of ``text``, in non-overlapping windows.

    Each window is scored on its own (its first token is context only), so the value depends on
    ``window``; keep it fixed when comparing variants.
    """
    import torch

    from ..models import tokenizer_for
    from ..torch_utils import device_of

    tok = tokenizer or tokenizer_for(model)
    ids = token_ids(tok, _data.resolve_text(text))[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"the text gives {ids.numel()} token(s); perplexity needs at least 2")
    device = device_of(model)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window]
            if chunk.numel() < 2:
                break
            inp = chunk.unsqueeze(0).to(device)  # [1, T]
            logits = model(input_ids=inp, use_cache=False).logits.float()  # [1, T, V]
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], inp[0, 1:], reduction="sum")
            nll += loss.item()
            count += chunk.numel() - 1
    return math.exp(nll / count)


def embed(model, sentences, *, tokenizer=None, batch_size: int = 64, max_length: int = 128):
    """Mean-pooled, L2-normalised sentence embeddings [n, hidden] (the sentence-transformers recipe)."""
    import torch

    from ..models import tokenizer_for
    from ..torch_utils import device_of

    tok = tokenizer or tokenizer_for(model)
    device = device_of(model)
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            batch = tok(list(sentences[i : i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state.float()  # [b, T, H]
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [b, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def _query(name: str) -> str:
    # "os.path.getsize" -> "os path getsize": names as a person would type them
    return name.replace(".", " ").replace("_", " ")


def retrieval_recall(model, *, tokenizer=None, pairs=None) -> tuple[float, object]:
    """Recall@1 of finding each function's docstring line from its name (no reference model needed).

    Returns (recall, document embeddings) so a comparison can reuse the embeddings.
    """
    pairs = list(pairs or _data.doc_pairs())
    names = [_query(n) for n, _ in pairs]
    docs = [d for _, d in pairs]
    q = embed(model, names, tokenizer=tokenizer)
    d = embed(model, docs, tokenizer=tokenizer)
    hits = (q @ d.T).argmax(dim=1)
    import torch

    recall = (hits == torch.arange(len(pairs))).float().mean().item()
    return recall, d


def embedding_agreement(reference, candidate, k: int = 5) -> dict:
    """Mean cosine between matching embeddings, and the share of each item's k nearest neighbours kept."""
    import torch

    cos = (reference * candidate).sum(-1).mean().item()

    def knn(e):
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=1).indices

    a, b = knn(reference), knn(candidate)
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)]).mean().item()
    return {"cosine": cos, f"top{k}_agreement": overlap}
