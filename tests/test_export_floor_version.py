"""Exports load with the oldest transformers that pyproject.toml allows, not only with the newest.

The exports are written by this environment's transformers (5.x) through the same family code
that `pretrain-export` runs (`save_pretrained` + `save_hf_assets`), then read back in a venv that
has the floor release of transformers from `pyproject.toml` installed over this environment's
site-packages (torch, tokenizers' wheel and the rest come from here; pip pulls what the floor
release pins). The old release must load tokenizer, model and CLIP processor, and compute the
same logits as the new one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from tests.launch import REPO

pytestmark = pytest.mark.slow

OLD_SIDE = r"""
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, CLIPModel, pipeline
from PIL import Image

gpt_dir, clip_dir = sys.argv[1], sys.argv[2]
out = {"version": transformers.__version__}
tok = AutoTokenizer.from_pretrained(gpt_dir)
gpt = AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
ids = tok("def f(x):\n    return x")["input_ids"]
out["gpt_tokenizer"] = type(tok).__name__
out["gpt_ids"] = ids
out["gpt_model_max_length"] = tok.model_max_length
with torch.no_grad():
    out["gpt_logits"] = gpt(input_ids=torch.tensor([ids])).logits[0, -1, :8].tolist()
generate = pipeline("text-generation", model=gpt_dir, device="cpu")
out["generated"] = generate("def f(x):", max_new_tokens=4, do_sample=False)[0]["generated_text"]

processor = AutoProcessor.from_pretrained(clip_dir)
clip = CLIPModel.from_pretrained(clip_dir).eval()
batch = processor(text=["a red square", "a blue circle"], images=[Image.new("RGB", (40, 30), (200, 20, 20))],
                  return_tensors="pt", padding=True)
out["clip_ids"] = batch["input_ids"].tolist()
with torch.no_grad():
    out["clip_logits"] = clip(**batch).logits_per_image[0].tolist()
print("RESULT " + json.dumps(out))
"""


def _floor_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"transformers\b", d))
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert match, f"pyproject.toml pins no floor for transformers: {spec!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def old_python(tmp_path_factory) -> tuple[Path, str]:
    """A venv over this environment with the floor release of transformers (a few seconds of pip).

    `--system-site-packages` sees the base interpreter's packages only; when the tests run inside a venv
    (the README's quickstart) torch and the rest live in that venv's site-packages, so a .pth file in the
    new venv adds this interpreter's site-packages too, after the new venv's own (whose older transformers,
    tokenizers and huggingface_hub win) and before the base interpreter's."""
    import sysconfig

    floor = _floor_version()
    venv = tmp_path_factory.mktemp("venv") / f"transformers-{floor}"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # running in a venv: its site-packages are not the system's
        inner = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        (Path(inner) / "_outer_environment.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in outer)
        )
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"transformers=={floor}"],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, f"pip could not install transformers=={floor}:\n{pip.stdout}\n{pip.stderr}"
    return py, floor


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny GPT-2 and a tiny CLIP, exported the way pretrain-export writes them."""
    from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel

    from data_pipelines.text.tokenizer import train_bpe_tokenizer
    from pretrain.models import clip as clip_family
    from pretrain.models import gpt as gpt_family

    root = tmp_path_factory.mktemp("exports")
    texts = [Path(p).read_text(errors="replace") for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    texts += ["a red square", "a blue circle"] * 50
    torch.manual_seed(0)

    gpt_dir = root / "gpt"
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    gpt.save_pretrained(gpt_dir, safe_serialization=True)
    gpt_family.save_hf_assets(gpt, train_bpe_tokenizer(texts, 512), gpt_dir)

    clip_dir = root / "clip"
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": 512,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=16,
        )
    ).eval()
    clip.save_pretrained(clip_dir, safe_serialization=True)
    clip_family.save_hf_assets(clip, train_bpe_tokenizer(texts, 512), clip_dir)
    return gpt_dir, clip_dir


def test_exports_load_and_agree_with_the_oldest_allowed_transformers(old_python, exports):
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, CLIPModel

    py, floor = old_python
    gpt_dir, clip_dir = exports
    proc = subprocess.run(
        [str(py), "-c", OLD_SIDE, str(gpt_dir), str(clip_dir)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"transformers {floor} failed on the exports:\n{proc.stderr[-4000:]}"
    old = json.loads(lines[0][len("RESULT ") :])
    from packaging.version import Version

    assert Version(old["version"]) == Version(floor)

    tok = AutoTokenizer.from_pretrained(gpt_dir)
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert old["gpt_ids"] == ids, "the old release tokenizes as the new one does"
    assert old["gpt_model_max_length"] == 32 == tok.model_max_length
    gpt = AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    with torch.no_grad():
        new_logits = gpt(input_ids=torch.tensor([ids])).logits[0, -1, :8]
    assert torch.allclose(torch.tensor(old["gpt_logits"]), new_logits, atol=1e-5)
    assert old["generated"].startswith("def f(x):")

    processor = AutoProcessor.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    batch = processor(
        text=["a red square", "a blue circle"],
        images=[Image.new("RGB", (40, 30), (200, 20, 20))],
        return_tensors="pt",
        padding=True,
    )
    assert old["clip_ids"] == batch["input_ids"].tolist()
    eos = processor.tokenizer.eos_token_id
    assert all(eos in row for row in old["clip_ids"]), "captions end with eos, where CLIP pools"
    with torch.no_grad():
        new_clip = clip(**batch).logits_per_image[0]
    assert torch.allclose(torch.tensor(old["clip_logits"]), new_clip, atol=1e-4)
