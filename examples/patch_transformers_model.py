"""Patch a Hugging Face transformers model with gatednorm, on the CPU: a tiny Mamba2 language model.

    python examples/patch_transformers_model.py

Needs ``transformers`` (``make test`` installs 5.24.0; ``pip install transformers`` next to the CPU
torch otherwise). The model is built from a small config with random weights, so nothing is downloaded.

``gatednorm.patch("transformers")`` replaces the ``forward`` of the gated RMSNorm classes of the
installed transformers release (Mamba2's ``MambaRMSNormGated`` among them; docs/usage.md, "Covered
upstreams") on the class, so a model built before the patch is covered too, checkpoints and
``state_dict`` keys are unchanged, and ``handle.undo()`` (or leaving the ``with`` block) puts the
original back. The script compares the logits and a training step with and without the patch and
shows how to see that the patch took effect.
"""

from __future__ import annotations

import sys
import warnings

import torch

import gatednorm
from gatednorm.integrations import call_counts, reset_call_counts

try:
    import transformers
    from transformers import Mamba2Config, Mamba2ForCausalLM
except ImportError:
    sys.exit("this example needs transformers: pip install transformers (make test installs it)")


def main() -> None:
    transformers.logging.set_verbosity_error()  # quiet the "falling back to the PyTorch implementation" notes
    # patch("transformers") imports every covered model file; Qwen3-Next's imports flash-linear-attention
    # where installed, which warns that Triton has no GPU to use here
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")

    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=128, hidden_size=64, state_size=16, num_heads=8, head_dim=16, n_groups=2,
                          num_hidden_layers=2, expand=2, chunk_size=8)
    model = Mamba2ForCausalLM(config)  # built before the patch: its norms are covered all the same
    ids = torch.randint(0, config.vocab_size, (2, 12))

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        """Logits, and the gradient of the first gated norm's weight after one language-model loss."""
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), model.backbone.layers[0].mixer.norm.weight.grad.clone()

    logits_ref, grad_ref = step()

    reset_call_counts()
    with gatednorm.patch("transformers", backend="native") as handle:
        print(f"patched {len(handle.replaced)} forwards, e.g. {handle.replaced[0]}")
        logits, grad = step()
        counts = call_counts()
    print("calls through gatednorm:", counts)
    assert counts == {"transformers.models.mamba2.modeling_mamba2.MambaRMSNormGated.forward@native": 2}  # a layer each

    # float32: gatednorm and transformers agree to float32 rounding (in bf16 gatednorm rounds once where
    # transformers rounds two or three times, so results differ by up to about one bf16 ulp)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    print(f"logits {tuple(logits.shape)} and the norm's weight gradient match the unpatched model "
          f"(max |diff| {float((logits - logits_ref).abs().max()):.1e})")
    assert gatednorm.patched() == []  # the with block undid the patch
    print("after the with block: nothing patched")


if __name__ == "__main__":
    main()
