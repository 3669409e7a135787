"""GumbelVisionPruner.save_pretrained / from_pretrained (huggingface_hub's PyTorchModelHubMixin): config and
safetensors weights in a local directory, a bit-identical round trip, strict loading."""
import copy
import json
import pickle

import pytest
import torch

from vtp import GumbelVisionPruner


def _trained(**kw):
    torch.manual_seed(0)
    pruner = GumbelVisionPruner(32, **kw)
    with torch.no_grad():  # weights no constructor produces: a loaded copy can only equal them by loading
        for p in pruner.parameters():
            p.add_(torch.randn_like(p))
    return pruner


@pytest.mark.parametrize("kw", [{}, dict(reduction=2, rule="topk", ratio=0.3, min_keep=2, norm=False, text_dim=16,
                                          keep_bias=1.5, threshold=0.4)])
def test_round_trip_is_bit_identical(tmp_path, kw):
    pruner = _trained(**kw)
    pruner.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_dim"] == 32 and all(config[k] == v for k, v in kw.items())
    torch.manual_seed(123)  # the constructor's random init must not survive the load
    loaded = GumbelVisionPruner.from_pretrained(tmp_path)
    assert not loaded.training and type(loaded) is GumbelVisionPruner
    assert (loaded.rule, loaded.ratio, loaded.min_keep, loaded.text_dim) == (pruner.rule, pruner.ratio,
                                                                              pruner.min_keep, pruner.text_dim)
    state, again = pruner.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    tokens = torch.randn(3, 10, 32)
    text = torch.randn(3, 16) if kw else None
    assert torch.equal(pruner.eval()(tokens, text=text).logits, loaded(tokens, text=text).logits)


def test_load_is_strict_and_local(tmp_path):
    _trained().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):  # weights of a 32-wide pruner do not fit a 48-wide one
        GumbelVisionPruner.from_pretrained(tmp_path, hidden_dim=48)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "text_dim": 8}))  # text_proj missing from weights
    with pytest.raises(RuntimeError):
        GumbelVisionPruner.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="local directory"):
        GumbelVisionPruner.from_pretrained(tmp_path / "missing")


def test_copies_still_work():
    pruner = _trained(text_dim=16)
    for clone in (copy.deepcopy(pruner), pickle.loads(pickle.dumps(pruner))):
        assert all(torch.equal(a, b) for a, b in zip(pruner.state_dict().values(), clone.state_dict().values()))
