"""The engine against the official rwkv==0.8.32 package (cpu fp32) on random official-layout checkpoints."""
import pytest
import torch

from engine import load_model
from bench.random_checkpoint import write_checkpoint
from tests.conftest import PARITY_SHAPES, rel_err

TOL = 1e-4   # max |diff| relative to max |logit|


@pytest.fixture(scope="module", params=sorted(PARITY_SHAPES))
def pair(request, ckpt_dir):
    """(our model, the rwkv package's model) on the same random checkpoint."""
    from rwkv.model import RWKV
    stem = ckpt_dir / f"parity-{request.param}"
    write_checkpoint(f"{stem}.pth", PARITY_SHAPES[request.param], seed=7)
    ours = load_model(f"{stem}.pth", "cpu fp32")
    theirs = RWKV(str(stem), "cpu fp32")      # the package appends ".pth" itself
    return ours, theirs


def reference_logits(theirs, tokens: list[int]) -> torch.Tensor:
    out, _ = theirs.forward(tokens, None, full_output=True)
    return out.reshape(len(tokens), -1).float()


@pytest.mark.parametrize("T", [1, 7, 64, 65, 300])
def test_full_sequence_matches_reference(pair, T):
    ours, theirs = pair
    tokens = torch.randint(0, ours.config.vocab_size, (T,), generator=torch.Generator().manual_seed(T)).tolist()
    expected = reference_logits(theirs, tokens)
    logits, state = ours.forward(torch.tensor([tokens]), None, full_output=True)
    assert logits.shape == (1, T, ours.config.vocab_size) and logits.dtype == torch.float32
    assert rel_err(logits[0], expected) <= TOL
    last, _ = ours.forward(torch.tensor([tokens]), None)
    assert last.shape == (1, ours.config.vocab_size)
    assert rel_err(last[0], expected[-1]) <= TOL


@pytest.mark.parametrize("T", [7, 65])
def test_token_by_token_matches_reference(pair, T):
    ours, theirs = pair
    tokens = torch.randint(0, ours.config.vocab_size, (T,), generator=torch.Generator().manual_seed(100 + T)).tolist()
    expected = reference_logits(theirs, tokens)
    ref_state = None
    state = ours.zero_state(1)
    for t, tok in enumerate(tokens):
        logits, state = ours.forward(torch.tensor([[tok]]), state)
        ref_out, ref_state = theirs.forward([tok], ref_state)
        assert rel_err(logits[0], ref_out.float()) <= TOL
        assert rel_err(logits[0], expected[t]) <= TOL
    # the recurrent state itself agrees with the package's (att shift, wkv, ffn shift per layer)
    for i in range(ours.config.n_layer):
        assert rel_err(state.att_x[i][0], ref_state[3 * i].float()) <= TOL
        assert rel_err(state.wkv[i][0], ref_state[3 * i + 1].float()) <= TOL
        assert rel_err(state.ffn_x[i][0], ref_state[3 * i + 2].float()) <= TOL


def test_safetensors_gives_same_logits(ckpt_dir, tiny_pth, tiny_model):
    from safetensors.torch import save_file
    sd = torch.load(tiny_pth, weights_only=True)
    save_file(sd, str(ckpt_dir / "tiny.safetensors"))
    other = load_model(ckpt_dir / "tiny.safetensors", "cpu fp32")
    tokens = torch.arange(40).view(1, 40)
    a, _ = tiny_model.forward(tokens, None, full_output=True)
    b, _ = other.forward(tokens, None, full_output=True)
    assert torch.equal(a, b)


def test_bf16_source_weights_load(ckpt_dir):
    """Released .pth files are bf16; they load and run in fp32."""
    path = ckpt_dir / "bf16src.pth"
    write_checkpoint(path, PARITY_SHAPES["c128-n32-v0present"], seed=3, dtype=torch.bfloat16)
    m = load_model(path, "cpu fp32")
    logits, _ = m.forward(torch.tensor([[1, 2, 3]]), None)
    assert torch.isfinite(logits).all()
