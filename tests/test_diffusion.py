"""rebel_diffusion/policies/diffusion.py: `merged_lora`'s cached merged weights on a tiny peft-adapted module (a linear
and a convolution): the merged forward equals the adapter's, W comes back bit for bit, the cache is reused while
nothing changed and rebuilt after an optimizer step, an in-place edit through `.data`, a new W or the adapter
disabled, and an exception, inside the block or in the middle of a merge, leaves nothing merged behind."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from rebel_diffusion.policies.diffusion import lora_sites, merged_lora


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(5, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.to_q(x).permute(0, 3, 1, 2))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    net = Net().requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "conv"]),
                            net)
    with torch.no_grad():  # B starts at 0: make the delta non-zero
        for param in lora_parameters(net):
            param.add_(0.5 * torch.randn(param.shape))
    return net


def lora_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in net.named_parameters() if "lora_" in n]


def base_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if "base_layer" in n}


X = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def merged_and_unmerged(net: Net) -> tuple[torch.Tensor, torch.Tensor]:
    """The output inside a `merged_lora` block (where the plain layers must be in place) and with the peft layers."""
    sites = lora_sites(net)
    with merged_lora(sites):
        assert all(type(getattr(parent, attribute)) in (torch.nn.Linear, torch.nn.Conv2d)
                   for parent, attribute, _ in sites)
        merged = net(X)
    return merged, net(X)


def test_merged_output_equals_the_adapter_and_w_is_restored_bit_for_bit_every_time(net):
    before = base_weights(net)
    for _ in range(3):  # the merge is always computed from W: no residue builds up over cycles
        merged, unmerged = merged_and_unmerged(net)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        after = base_weights(net)
        assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(type(layer) is not torch.nn.Linear for _, _, layer in lora_sites(net))  # the peft layers are back


def record_merges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the merge ops called from now on: `torch.addmm` (a linear's merge) and `torch.add` (others')."""
    calls = []
    for name in ("addmm", "add"):
        original = getattr(torch, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, recorded)
    return calls


def test_the_merged_weights_are_reused_while_nothing_changed(net, monkeypatch):
    merged_and_unmerged(net)
    buffers = [layer._rebel_merged.weight for _, _, layer in lora_sites(net)]
    merges = record_merges(monkeypatch)
    merged, unmerged = merged_and_unmerged(net)
    assert merges == []
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # A merge that is due rewrites the same buffers in place: no new allocation per block.
    for param in lora_parameters(net):
        param.data.mul_(1.5)
    merged_and_unmerged(net)
    assert sorted(merges) == ["add", "addmm"]
    assert all(layer._rebel_merged.weight is buffer for (_, _, layer), buffer in zip(lora_sites(net), buffers))


def test_an_optimizer_step_changes_the_merged_weights(net):
    first, _ = merged_and_unmerged(net)
    optimizer = torch.optim.Adam(lora_parameters(net), lr=0.1)
    for param in lora_parameters(net):
        param.requires_grad_(True)
    net(X).square().mean().backward()
    optimizer.step()
    merged, unmerged = merged_and_unmerged(net)
    assert not torch.allclose(unmerged, first, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_an_edit_through_data_changes_the_merged_weights(net):
    merged_and_unmerged(net)
    net.to_q.lora_B["default"].weight.data.mul_(-2)  # `.data` bypasses the version counter: compared by value
    merged, unmerged = merged_and_unmerged(net)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_a_new_base_weight_changes_the_merged_weights(net):
    merged_and_unmerged(net)
    with torch.no_grad():
        net.to_q.base_layer.weight.add_(1.0)
    merged, unmerged = merged_and_unmerged(net)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_a_disabled_adapter_merges_nothing_and_the_merge_is_right_again_afterwards(net):
    merged_and_unmerged(net)
    for _, _, layer in lora_sites(net):
        layer.enable_adapters(False)
    merged, base = merged_and_unmerged(net)
    assert torch.equal(merged, base)  # the base layers on W itself
    for _, _, layer in lora_sites(net):
        layer.enable_adapters(True)
    merged, unmerged = merged_and_unmerged(net)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_an_error_inside_the_block_or_during_a_merge_leaves_nothing_merged(net, monkeypatch):
    before = base_weights(net)
    sites = lora_sites(net)
    with pytest.raises(RuntimeError, match="no-grad"):
        with merged_lora(sites):
            pass
    with pytest.raises(KeyError), torch.no_grad():
        with merged_lora(sites):
            raise KeyError("inside")
    # The convolution's merge fails after the linear's weight was swapped in: the linear is put back too.
    with torch.no_grad():
        net.conv.lora_B["default"].weight.mul_(2)

    def fail(*args, **kwargs):
        raise MemoryError("during the merge")

    monkeypatch.setattr(torch, "add", fail)
    with pytest.raises(MemoryError), torch.no_grad():
        with merged_lora(sites):
            pass
    monkeypatch.undo()
    after = base_weights(net)
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(getattr(parent, attribute) is layer for parent, attribute, layer in sites)
    merged, unmerged = merged_and_unmerged(net)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)

    # The linear's merge fails half-way through its buffer; the adapter is then set back to the values the buffer held
    # before: the half-written buffer must not pass for their merge.
    addmm = torch.addmm

    def half_written(*args, out, **kwargs):
        addmm(*args, out=out, **kwargs)
        out[0].fill_(float("nan"))
        raise MemoryError("during the merge")

    lora_b = net.to_q.lora_B["default"].weight
    with torch.no_grad():
        lora_b.mul_(2)
    monkeypatch.setattr(torch, "addmm", half_written)
    with pytest.raises(MemoryError), torch.no_grad():
        with merged_lora(sites):
            pass
    monkeypatch.undo()
    with torch.no_grad():
        lora_b.div_(2)  # exact: the values of the last good merge
    merged, unmerged = merged_and_unmerged(net)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_the_pipeline_class_a_model_index_names_is_read_before_any_weights_load(tmp_path):
    import json

    from rebel_diffusion.policies.diffusion import hub_pipeline_class

    pipelines = {"StableDiffusion3Pipeline": object, "FluxPipeline": object}
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert hub_pipeline_class(str(tmp_path), pipelines) == "FluxPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline, not a StableDiffusion3Pipeline or FluxPipeline"):
        hub_pipeline_class(str(tmp_path), pipelines)
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        hub_pipeline_class(str(tmp_path), pipelines)
