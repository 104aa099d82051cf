import torch

from rebel_diffusion.trajectory import Trajectory


def make(batch: int, steps: int = 3, offset: float = 0.0) -> Trajectory:
    states = torch.arange(batch * steps * 2, dtype=torch.float32).reshape(batch, steps, 2) + offset
    return Trajectory(
        prompts=[f"p{i}" for i in range(batch)],
        states=states,
        actions=states + 1,
        log_probs=torch.arange(batch * steps, dtype=torch.float32).reshape(batch, steps),
        mask=torch.ones(batch, steps, dtype=torch.bool),
        outputs=torch.zeros(batch, 3, 4, 4),
        conditioning=torch.randn(batch, 5, 8),
    )


def test_index_selects_every_field_consistently():
    t = make(4)
    sub = t[torch.tensor([2, 0])]
    assert sub.prompts == ["p2", "p0"]
    assert torch.equal(sub.states, t.states[[2, 0]])
    assert torch.equal(sub.log_probs, t.log_probs[[2, 0]])
    assert torch.equal(sub.conditioning, t.conditioning[[2, 0]])
    assert sub.rewards is None
    assert t[1:3].prompts == ["p1", "p2"]


def test_cat_concatenates_and_keeps_order():
    a, b = make(2), make(3, offset=100)
    a.rewards, b.rewards = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    c = Trajectory.cat([a, b])
    assert len(c) == 5 and c.num_steps == 3
    assert c.prompts == ["p0", "p1", "p0", "p1", "p2"]
    assert torch.equal(c.rewards, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(c.states[2:], b.states)


def test_masked_sum_ignores_padding():
    t = make(2)
    t.mask[1, 2] = False  # a shorter second sequence, as a text policy would have
    sums = t.masked_sum(t.log_probs)
    assert sums.tolist() == [0 + 1 + 2, 3 + 4]


def test_list_outputs_are_indexed_and_concatenated_like_tensors():
    a, b = make(2), make(1)
    a.outputs, b.outputs = ["x", "y"], ["z"]
    assert a[[1, 0]].outputs == ["y", "x"]
    assert Trajectory.cat([a, b]).outputs == ["x", "y", "z"]


def test_cat_right_pads_variable_length_fields_and_masks_them_out():
    a = Trajectory(prompts=["p"], states=torch.tensor([[5, 6]]), actions=torch.tensor([[1, 2, 3]]),
                   log_probs=torch.tensor([[-1.0, -2.0, -3.0]]), mask=torch.tensor([[True, True, True]]),
                   outputs=["abc"], conditioning=torch.tensor([[1, 1]]))
    b = Trajectory(prompts=["q"], states=torch.tensor([[7, 8, 9]]), actions=torch.tensor([[4]]),
                   log_probs=torch.tensor([[-4.0]]), mask=torch.tensor([[True]]), outputs=["d"],
                   conditioning=torch.tensor([[1, 1, 1]]))
    c = Trajectory.cat([a, b])
    assert c.actions.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert c.mask.tolist() == [[True, True, True], [True, False, False]]
    assert c.states.tolist() == [[5, 6, 0], [7, 8, 9]] and c.conditioning.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert c.masked_sum(c.log_probs).tolist() == [-6.0, -4.0]
