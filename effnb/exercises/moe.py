"""Exercises of notebook 04 (Mixture-of-Experts): active share, load per expert, imbalance.

The checkers take the numbers the notebook produced (experts, top_k, the routing of a text), so they
hold for any model and any machine.
"""

from __future__ import annotations

from . import ExerciseError, as_number, close_to, exercise


def _ints(values, what: str) -> list[int]:
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    try:
        flat = []
        for v in values:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return [int(v) for v in flat]
    except TypeError:
        raise ExerciseError(f"{what} should be a list of integers, got {type(values).__name__}") from None


@exercise("moe.active_share", solution="answer = TOP_K / EXPERTS")
def _active_share(answer, *, experts, top_k):
    """A dense FFN is split into `experts` equal experts and every token is routed to `top_k` of them. What
    fraction of the FFN's weights does one token use (leave the small router out)?

    Hint: Each expert holds 1/experts of the neurons; a token visits top_k experts.

    Why: Each expert holds 1/experts of the FFN's neurons and a token visits top_k of them, so it uses top_k /
    experts of the FFN weights: the compute per token falls while the memory does not.
    """
    value = as_number(answer, "the share")
    expected = top_k / experts
    if close_to(value, expected, rel=1e-6):
        return
    if close_to(value, 100 * expected, rel=1e-6):
        raise ExerciseError("that is a percentage: give the share as a fraction between 0 and 1")
    if close_to(value, experts / top_k, rel=1e-6):
        raise ExerciseError("upside down: the share is the part used (top_k experts) over the whole (experts)")
    if close_to(value, 1 / experts, rel=1e-6):
        raise ExerciseError("that is one expert's share; each token visits top_k experts")
    raise ExerciseError(f"{value:.4g} is not the fraction of the FFN weights one token uses: each of the "
                        f"{experts} experts holds an equal part, and a token visits {top_k} of them")


@exercise(
    "moe.tokens_per_expert",
    solution="answer = torch.bincount(expert_index.flatten(), minlength=EXPERTS).tolist()",
)
def _tokens_per_expert(answer, *, expert_index, experts):
    """`expert_index` holds, for each token, the `top_k` experts it was routed to (shape [tokens, top_k]).
    Count the assignments each of the `experts` experts got, as a list of length `experts`.

    Hint: Flatten expert_index and count each expert id, including experts that got nothing:
    torch.bincount(..., minlength=experts).

    Why: Every token contributes top_k assignments; flattening the [tokens, top_k] index and counting each
    expert id (minlength keeps idle experts at 0) gives the load per expert.
    """
    rows = expert_index.tolist() if hasattr(expert_index, "tolist") else [list(r) for r in expert_index]
    counts = [0] * experts
    first = [0] * experts
    for r in rows:
        for e in r:
            counts[e] += 1
        first[r[0]] += 1
    got = _ints(answer, "the counts")
    if got == counts:
        return
    if len(got) < experts and got == counts[: len(got)]:
        raise ExerciseError(f"{len(got)} counts for {experts} experts: experts with no token are missing "
                            "at the end (bincount needs minlength=experts)")
    if got == first:
        raise ExerciseError("those count only each token's first choice; every token has top_k assignments, "
                            f"so the counts must add up to {sum(counts)}")
    if len(got) == experts and sum(got) != sum(counts):
        raise ExerciseError(f"the counts add up to {sum(got)}, but {len(rows)} tokens x top_k={len(rows[0])} "
                            f"make {sum(counts)} assignments")
    if len(got) != experts:
        raise ExerciseError(f"{len(got)} counts for {experts} experts: give one count per expert, in expert order")
    wrong = next(e for e in range(experts) if got[e] != counts[e])
    raise ExerciseError(f"expert {wrong} got {counts[wrong]} assignment(s) in expert_index, your list says "
                        f"{got[wrong]}; count every occurrence of each expert id")


@exercise("moe.imbalance", solution="answer = max(counts) / (sum(counts) / len(counts))")
def _imbalance(answer, *, counts):
    """`counts` are the assignments per expert of one layer. Compute the load imbalance as the busiest
    expert's load over the mean load (1.0 = perfectly balanced).

    Hint: max(counts) / (sum(counts) / len(counts)).

    Why: The busiest expert sets the pace of the layer (the others wait for it); over the mean load this is
    1.0 for a perfect balance and experts / top_k at worst, when every token sends one of its top_k choices to
    the same expert.
    """
    c = _ints(counts, "counts")
    value = as_number(answer, "the imbalance")
    mean = sum(c) / len(c)
    expected = max(c) / mean
    if close_to(value, expected, rel=1e-6):
        return
    if min(c) > 0 and close_to(value, max(c) / min(c), rel=1e-6):
        raise ExerciseError("that is max / min: the imbalance compares the busiest expert with the mean load")
    if close_to(value, 1 / expected, rel=1e-6):
        raise ExerciseError("upside down: busiest load over mean load is at least 1")
    if close_to(value, max(c) / sum(c), rel=1e-6):
        raise ExerciseError("that is the busiest expert's share of all assignments; divide by the mean load instead")
    busy = [x for x in c if x > 0]
    if len(busy) < len(c) and close_to(value, max(c) / (sum(c) / len(busy)), rel=1e-6):
        raise ExerciseError(f"that mean leaves out the idle experts: average over all {len(c)} experts, "
                            "including those with 0 assignments")
    raise ExerciseError(f"{value:.4g} is not the busiest load over the mean load: the busiest expert has "
                        f"{max(c)} assignments; the mean is sum(counts) / {len(c)} experts")
