import torch

from hypersd.losses.shown import shown_rows, shown_target


def test_a_pixel_past_the_bound_its_target_is_on_costs_nothing():
    pred = torch.tensor([-1.4, -1.4, -0.5, -0.5, 1.3, 1.3, 0.2])
    tgt = torch.tensor([-1.0, -0.6, -1.2, -0.7, 1.1, 0.4, 1.5])
    out = shown_target(pred, tgt, -1.0, 1.0)
    # past -1 on a black target; past -1 on a grey one (pulled back); inside on a clamped target;
    # inside; past 1 on a white target; past 1 on a grey one; inside on a clamped white one
    assert torch.equal(out, torch.tensor([-1.4, -0.6, -1.0, -0.7, 1.3, 0.4, 1.0]))


def test_the_gradient_stops_only_where_the_clamp_hides_the_error():
    pred = torch.tensor([-1.3, -0.9, -1.3], requires_grad=True)
    tgt = torch.tensor([-1.0, -1.0, -0.8])
    (pred - shown_target(pred, tgt, -1.0, 1.0)).pow(2).sum().backward()
    assert pred.grad.tolist()[0] == 0.0  # the speck is below black: unseen
    assert pred.grad[1] > 0 and pred.grad[2] < 0  # a grey speck is pushed down; a lost stroke pulled up


def test_only_rows_that_end_at_the_image_are_compared_as_shown():
    pred, tgt = torch.full((2, 1, 2, 2), -1.5), torch.full((2, 1, 2, 2), -1.2)
    out = shown_rows(tgt, pred, torch.tensor([True, False]), -1.0, 1.0)
    assert torch.equal(out[0], pred[0]) and torch.equal(out[1], tgt[1])  # a noisy x at t_b is no image
