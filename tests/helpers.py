"""Small synthetic data sets shared by the trainer tests."""

from __future__ import annotations

import random


def tiny_rows(objective: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples (pairs for DPO, groups of 4 for GRPO) of 2-digit addition in the objective's format."""
    r = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        a, b = r.randint(0, 49), r.randint(0, 49)
        prompt = f"{a}+{b}="
        if objective == "dpo":
            rows.append({"prompt": prompt, "chosen": str(a + b), "rejected": str(a + b + 1 + i % 3)})
        elif objective == "kto":
            rows.append({"prompt": prompt, "completion": str(a + b + (i % 2)), "label": i % 2 == 0})
        elif objective == "grpo":
            for j in range(4):
                rows.append({"prompt": prompt, "completion": str(a + b + j), "score": float(j == 0) + 0.1 * j,
                             "prompt_id": i})
        else:
            rows.append({"prompt": prompt, "completion": str(a + b)})
    return rows
