"""The toolkit's own multiple-choice scoring: each choice's summed log-likelihood after the context,
from one forward pass of the causal LM per choice, and the accuracies the harness reports from them
(acc: the highest sum; acc_norm: the highest sum per character of the choice). Kept independent of
lm_eval so the harness's numbers can be checked against it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str], delimiter: str = " ") -> list[float]:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    out = []
    for choice in choices:
        cont = tokenizer(delimiter + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont], device=device)
        # position i predicts token i+1: the continuation's tokens are predicted from len(ctx)-1 on
        logp = model(ids).logits[0, len(ctx) - 1 : -1].float().log_softmax(-1)
        out.append(logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum().item())
    return out


def multiple_choice(model, tokenizer, items: list[dict]) -> dict[str, float]:
    """{"acc", "acc_norm"} over items {"context", "choices", "gold"} (first maximum wins a tie, as numpy's argmax)."""
    model.eval()
    acc = acc_norm = 0
    for item in items:
        ll = choice_loglikelihoods(model, tokenizer, item["context"], item["choices"])
        norm = [v / len(c) for v, c in zip(ll, item["choices"])]
        acc += ll.index(max(ll)) == item["gold"]
        acc_norm += norm.index(max(norm)) == item["gold"]
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def read_items(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
