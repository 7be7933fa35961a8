"""Caption proxies (``train.caption_proxy_weight``): a learned vector per distinct training
caption, both towers' features classified among all of them. Against a hand computation, the
gradients it sends, through gradient accumulation, across two gloo processes, learning on a tiny
set, and resumed only on the same captions (bitwise resume: test_objectives)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from coembed.training.proxies import CaptionProxies
from tests.helpers import (
    TINY,
    gloo_group,
    losses_on_a_fixed_batch,
    ok,
    run_cli,
    run_two_processes,
    tiny_train_run,
    train_args,
)

CAPTIONS = [f"a picture of {('red', 'blue', 'green')[i % 3]} things" for i in range(8)]


def test_proxies_have_one_row_per_distinct_caption_in_sorted_order():
    proxies = CaptionProxies(["b", "a", "b", "c"], 4, min_pairs=1)
    assert proxies.captions == ["a", "b", "c"] and proxies.weight.shape == (3, 4)
    assert proxies.ids(["c", "b", "b", "a"]).tolist() == [2, 1, 1, 0]
    again = CaptionProxies(["c", "a", "b"], 4, min_pairs=1)
    assert again.digest == proxies.digest and torch.equal(again.weight, proxies.weight)
    assert CaptionProxies(["a", "b", "d"], 4, min_pairs=1).digest != proxies.digest


def test_only_captions_of_several_pairs_get_a_proxy():
    proxies = CaptionProxies(["b", "a", "b", "c", "c", "c"], 4)  # min_pairs 2, the default
    assert proxies.captions == ["b", "c"]
    ids = proxies.ids(["a", "b", "c", "a"])
    assert ids.tolist() == [-1, 0, 1, -1]
    f = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    # Rows without a proxy add nothing: the term is that of the rows with one.
    whole = proxies.summed_term((f,), ids, 0.1)
    assert float(whole.detach()) == pytest.approx(
        float(proxies.summed_term((f[1:3],), ids[1:3], 0.1).detach())
    )
    # Data whose captions are all distinct has no proxies and no term.
    none = CaptionProxies(["a", "b"], 4)
    assert (
        none.weight.shape == (0, 4)
        and float(none.summed_term((f,), none.ids(["a"] * 4), 0.1).detach()) == 0.0
    )


def test_proxy_term_equals_hand_computation():
    proxies = CaptionProxies(["x", "y", "z"], 2, min_pairs=1)
    with torch.no_grad():
        proxies.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    ids = torch.tensor([0, 2])
    t = 0.5
    units = [[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]]

    def ce(f: list[float], k: int) -> float:
        logits = [(f[0] * u[0] + f[1] * u[1]) / t for u in units]
        return -(logits[k] - math.log(sum(math.exp(v) for v in logits)))

    want = sum((ce(i, k) + ce(x, k)) / 2 for i, x, k in zip(image.tolist(), text.tolist(), [0, 2]))
    got = float(proxies.summed_term((image, text), ids, t).detach())
    assert got == pytest.approx(want, rel=1e-6)


def one_run(settings: list[str], accum: int = 1):
    run = tiny_train_run(
        CAPTIONS,
        [*TINY, "train.caption_proxy_weight=1", f"train.accum_steps={accum}", *settings],
        batchnorm_eval=True,
    )
    from coembed.training.proxies import proxies_for

    run.proxies = proxies_for(run.cfg, CAPTIONS, torch.device("cpu"), run.optimizer)
    return run


def test_proxy_gradients_reach_both_towers_and_the_proxies_of_the_batch():
    from coembed.training.step import forward_loss

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def grads(weight: str) -> tuple[dict, torch.Tensor]:
        run = one_run([f"train.caption_proxy_weight={weight}"])
        tokens = run.tokenizer(CAPTIONS)
        forward_loss(run, images, tokens, caption_ids=run.proxies.ids(CAPTIONS)).backward()
        named = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
        return named, run.proxies.weight.grad

    plain, _ = grads("1e-30")  # the same graph, the term all but weighed out
    with_proxies, proxy_grad = grads("1")
    changed = {n for n in plain if not torch.allclose(plain[n], with_proxies[n], atol=1e-9)}
    assert any(n.startswith("visual.") for n in changed)
    assert any(n.startswith("text.") for n in changed)
    # Every proxy is a negative of every row, so all three get gradient.
    assert proxy_grad.shape == (3, 32) and (proxy_grad.abs().sum(dim=1) > 0).all()


def test_proxies_through_accumulation_equal_one_batch():
    from coembed.training.step import accumulated_backward, forward_loss

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    whole, split = one_run([]), one_run([], accum=2)
    tokens = whole.tokenizer(CAPTIONS)
    ids = whole.proxies.ids(CAPTIONS)
    loss = forward_loss(whole, images, tokens, caption_ids=ids)
    loss.backward()
    got = accumulated_backward(split, images, tokens, caption_ids=ids)
    assert float(got) == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(
        split.proxies.weight.grad, whole.proxies.weight.grad, rtol=1e-5, atol=1e-8
    )


def test_proxies_loss_falls_on_a_tiny_set():
    losses = losses_on_a_fixed_batch(one_run(["train.warmup_steps=0"]), CAPTIONS)
    assert losses[-1] < 0.7 * losses[0], losses


def proxy_worker(rank: int, world: int, port: int, queue) -> None:
    from coembed.training.views import average_head_gradients

    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 6))
        proxies = CaptionProxies(["a", "b", "c", "d"], 6, min_pairs=1)
        rows = slice(rank * 4, (rank + 1) * 4)
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
        f = torch.nn.functional.normalize(net(x[rows]), dim=-1)
        ids = proxies.ids(["a", "b", "a", "c", "d", "d", "b", "a"])[rows]
        (proxies.summed_term((f, f), ids, 0.2) / 4).backward()
        run = SimpleNamespace(dist=SimpleNamespace(world=world), heads=lambda: [proxies])
        average_head_gradients(run)
        queue.put(
            (
                rank,
                [p.grad.numpy().copy() for p in net.parameters()],
                proxies.weight.grad.numpy().copy(),
            )
        )


def test_proxies_across_two_processes_match_one_process():
    results = run_two_processes(proxy_worker)
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 6)
    proxies = CaptionProxies(["a", "b", "c", "d"], 6, min_pairs=1)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    f = torch.nn.functional.normalize(net(x), dim=-1)
    ids = proxies.ids(["a", "b", "a", "c", "d", "d", "b", "a"])
    (proxies.summed_term((f, f), ids, 0.2) / 8).backward()
    for _, grads, proxy_grad in results:
        for g, p in zip(grads, net.parameters()):
            torch.testing.assert_close(torch.from_numpy(g), p.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            torch.from_numpy(proxy_grad), proxies.weight.grad, atol=1e-6, rtol=1e-5
        )


def test_resume_refuses_proxies_of_other_captions(tmp_path):
    from tests.helpers import copy_images, shipped_rows, write_csv

    rows = shipped_rows(16)
    copy_images(rows, tmp_path / "images")
    first = write_csv(
        tmp_path / "a.csv", [(f"images/{a}", f"topic {i % 4}") for i, (a, _) in enumerate(rows)]
    )
    out = tmp_path / "run"
    settings = ["--set", "train.caption_proxy_weight=1", "--set", "train.checkpoint_every=2"]
    ok(run_cli(*train_args(first, out, *settings, steps=4)))
    step2 = out / "checkpoints" / "step-0000002"
    assert (step2 / "proxies.safetensors").is_file()
    # The same images under other captions, as a changed CSV would give on --resume.
    other = write_csv(
        tmp_path / "a.csv",
        [(f"images/{a}", f"topic {i % 4} again") for i, (a, _) in enumerate(rows)],
    )
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000004")
    result = run_cli("train", "--output", str(out), "--resume", "--train-data", str(other))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "caption proxies were trained for other captions" in lines[0], (
        result.stderr
    )
