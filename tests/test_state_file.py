"""State-tuning files: the orientation proven against the rwkv package, and every misfit file refused by name."""
import pytest
import torch

from bench.random_checkpoint import write_checkpoint
from engine import ModelLoadError, load_model
from engine.formats.state_file import load_state_file, save_state_file, state_digest
from tests.conftest import PARITY_SHAPES, rel_err

TOL = 1e-4   # as in test_model_parity: max |diff| relative to max |logit|


@pytest.fixture(scope="module", params=sorted(PARITY_SHAPES))
def pair(request, ckpt_dir):
    from rwkv.model import RWKV
    stem = ckpt_dir / f"statefile-{request.param}"
    write_checkpoint(f"{stem}.pth", PARITY_SHAPES[request.param], seed=11)
    return load_model(f"{stem}.pth", "cpu fp32"), RWKV(str(stem), "cpu fp32")


def tokens(model, n, seed):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def package_time_states(theirs, prompt) -> dict[str, torch.Tensor]:
    """The rwkv package's per-layer WKV state after ``prompt``, saved as a state-tuning file saves it (as-is)."""
    _, state = theirs.forward(prompt, None)
    n_layer = len(state) // 3
    return {f"blocks.{i}.att.time_state": state[3 * i + 1].float().clone() for i in range(n_layer)}


def package_logits(theirs, time_states, cont) -> torch.Tensor:
    """The rwkv package continuing from those WKV states with zero token shifts (what the format implies)."""
    state = []
    for i in range(len(time_states)):
        wkv = time_states[f"blocks.{i}.att.time_state"]
        C = wkv.shape[0] * wkv.shape[1]
        state += [torch.zeros(C), wkv.clone(), torch.zeros(C)]
    out, _ = theirs.forward(cont, state, full_output=True)
    return out.reshape(len(cont), -1).float()


def test_state_file_orientation_matches_the_rwkv_package(pair, tmp_path):
    ours, theirs = pair
    sd = package_time_states(theirs, tokens(ours, 37, seed=1))
    torch.save(sd, tmp_path / "tuned.pth")
    state = load_state_file(tmp_path / "tuned.pth", ours.config)
    assert state.batch_size == 1 and all(float(t.abs().max()) == 0 for t in state.att_x + state.ffn_x)
    cont = tokens(ours, 9, seed=2)
    expected = package_logits(theirs, sd, cont)
    logits, _ = ours.forward(torch.tensor([cont]), state, full_output=True)
    assert rel_err(logits[0], expected) <= TOL
    # the check can tell the orientations apart: the transposed state gives other logits
    transposed = {k: v.transpose(1, 2).contiguous() for k, v in sd.items()}
    torch.save(transposed, tmp_path / "transposed.pth")
    wrong, _ = ours.forward(torch.tensor([cont]), load_state_file(tmp_path / "transposed.pth", ours.config),
                            full_output=True)
    assert rel_err(wrong[0], expected) > 100 * TOL


def test_state_file_changes_the_output(pair, tmp_path):
    ours, theirs = pair
    torch.save(package_time_states(theirs, tokens(ours, 20, seed=3)), tmp_path / "s.pth")
    cont = torch.tensor([tokens(ours, 5, seed=4)])
    tuned, _ = ours.forward(cont, load_state_file(tmp_path / "s.pth", ours.config))
    plain, _ = ours.forward(cont, ours.zero_state(1))
    assert rel_err(tuned, plain) > 1e-2


def test_save_and_load_round_trip_pth_and_safetensors(tiny_model, tmp_path):
    _, state = tiny_model.forward(torch.tensor([[5, 6, 7, 8]]), None)
    for name in ("s.pth", "s.safetensors"):
        save_state_file(tmp_path / name, state)
        back = load_state_file(tmp_path / name, tiny_model.config)
        assert all(torch.equal(a, b) for a, b in zip(back.wkv, state.wkv))
        assert all(float(t.abs().max()) == 0 for t in back.att_x + back.ffn_x)


def test_state_digest_follows_the_content(tiny_model, tmp_path):
    _, state = tiny_model.forward(torch.tensor([[5, 6, 7]]), None)
    save_state_file(tmp_path / "a.pth", state)
    a = load_state_file(tmp_path / "a.pth", tiny_model.config)
    assert state_digest(a) == state_digest(load_state_file(tmp_path / "a.pth", tiny_model.config))
    a.wkv[1][0, 0, 0, 0] += 1e-6
    assert state_digest(a) != state_digest(load_state_file(tmp_path / "a.pth", tiny_model.config))
    assert len(state_digest(a)) == 64


def good_file(cfg) -> dict:
    return {f"blocks.{i}.att.time_state": torch.randn(cfg.n_head, cfg.head_size, cfg.head_size)
            for i in range(cfg.n_layer)}


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("blocks.1.att.time_state"), r"layer\(s\) \[1\]"),
    (lambda sd: sd.update({"blocks.9.att.time_state": sd["blocks.0.att.time_state"]}), "layer 9, but the model has 3"),
    (lambda sd: sd.update({"blocks.2.att.time_state": torch.zeros(6, 32, 32)}),
     r"blocks.2.att.time_state has shape \(6, 32, 32\), the model needs \(3, 64, 64\)"),
    (lambda sd: sd.update({"blocks.0.att.time_maa": torch.zeros(3)}), "unknown key 'blocks.0.att.time_maa'"),
    (lambda sd: sd.update({"blocks.1.att.time_state": [1, 2, 3]}), "'blocks.1.att.time_state' is a list, not a tensor"),
    (lambda sd: sd.update({"blocks.1.att.time_state": torch.zeros(3, 64, 64, dtype=torch.int32)}), "dtype"),
    (lambda sd: sd["blocks.0.att.time_state"].__setitem__((0, 0, 0), float("nan")), "NaN"),
])
def test_misfit_files_are_refused_by_name(tiny_model, tmp_path, change, message):
    cfg = tiny_model.config                      # 3 layers, 3 heads of 64
    sd = good_file(cfg)
    change(sd)
    path = tmp_path / "misfit.pth"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_state_file(path, cfg)
    assert str(path) in str(err.value)


def test_other_models_state_file_is_refused(tiny_model, tmp_path):
    """A state tuned for another model size (other heads, head size or depth) names what does not fit."""
    path = tmp_path / "other.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(2, 32, 32) for i in range(2)}, path)
    with pytest.raises(ModelLoadError, match=r"has shape \(2, 32, 32\), the model needs \(3, 64, 64\)"):
        load_state_file(path, tiny_model.config)


@pytest.mark.parametrize("content", [b"", b"not a pickle", None])
def test_unreadable_files_are_refused(tiny_model, tmp_path, content):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save([torch.zeros(1)], path)       # a list, not a dict
    else:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=str(path)):
        load_state_file(path, tiny_model.config)
    with pytest.raises(ModelLoadError, match="no such state file"):
        load_state_file(tmp_path / "missing.pth", tiny_model.config)
