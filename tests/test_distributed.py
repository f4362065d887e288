"""Several ranks (gmtier.distributed) on CPU with gloo, two processes: a 2-rank run equals the
1-process run of the same global batch (resident, tiered, layer-major), the dense part is the same
on every rank, kill -9 of a rank then resume gives the uninterrupted losses, and the clear errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from gmtier import config
from gmtier.cli import main
from gmtier.checkpoint import CheckpointError
from gmtier.distributed import Ranks, placement
from gmtier.evaluate import load_run, split_perplexity
from gmtier.train import Trainer, train
from test_train import _tiered_available, _write_toml, data_dir, losses_of, tiny  # noqa: F401 (fixture)

STEPS = 10
# One rank's process: one thread (the box has 2 cores for both), the trainer through the CLI.
_RANK = ("import sys, torch; torch.set_num_threads(1); from gmtier.commands import train; "
         "train(sys.argv[1:])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(cfg_path: Path, world: int = 2, *extra: str, rank_code: str = _RANK) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GMTIER_DIST_TIMEOUT_S="60")
        procs.append(subprocess.Popen([sys.executable, "-c", rank_code, "--config", str(cfg_path), *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs, timeout=120) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def _wait_for_steps(procs, run_dir: Path, n: int, timeout: float) -> None:
    """Until the run has logged `n` steps; every rank must still be running then."""
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and not any(p.poll() is not None for p in procs):
        if metrics.exists() and len(losses_of(run_dir)) >= n:
            break
        time.sleep(0.005)
    assert all(p.poll() is None for p in procs), "finished too soon:\n" + procs[0].communicate()[0]


def _resume_two_ranks(cfg: Path) -> subprocess.CompletedProcess:
    """`gmtier train --resume --nproc 2` (torchrun) of the run."""
    code = "import sys; from gmtier.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, "train", "--config", str(cfg), "--resume", "--nproc", "2"],
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1", GMTIER_DIST_TIMEOUT_S="60"))


def _sections(mode: str, **train_keys):
    experts = dict(mode=mode, io_threads=1, adam_threads=1)
    if mode == "tiered":  # 6 records for the machine: 3 a rank, for its 2 layers x 2 experts (pages every step)
        experts["ram_budget"] = 6 * 2 * 64 * 128 * 4 * 3 + 6 * 8192
    return dict(train=dict(steps=STEPS, **train_keys), experts=experts)


def _reference(data_dir, run, mode, batch_size, micro_batches=1):
    s = _sections(mode, batch_size=batch_size, micro_batches=micro_batches, checkpoint_every=STEPS)
    return train(tiny(data_dir, run, **s), log=lambda m: None)


def _dense(path: Path) -> dict:
    return {k: v for k, v in load_file(str(path)).items() if ".experts." not in k}


@pytest.mark.parametrize("mode,micro_batches", [
    ("resident", 1),
    pytest.param("tiered", 1, marks=pytest.mark.skipif(not _tiered_available(), reason="no ExpertStore")),
    pytest.param("tiered", 2, marks=pytest.mark.skipif(not _tiered_available(), reason="no ExpertStore")),
    ("resident", 2),
])
def test_two_ranks_equal_one_process(data_dir, tmp_path, mode, micro_batches):
    """2 ranks x micro_batches x 4 sequences == 1 process over the same 8 x micro_batches sequences
    (rank r takes the r-th contiguous half of the step), fp32, 1e-5 over 10 steps; the dense
    weights are bitwise the same on both ranks, and close to the 1-process run's."""
    # One process: the same sequences in the same order (with micro-batches: 2 x as many of 4).
    if micro_batches == 1:
        ref = _reference(data_dir, tmp_path / "ref", mode, batch_size=8)
    else:
        ref = _reference(data_dir, tmp_path / "ref", mode, batch_size=4, micro_batches=2 * micro_batches)
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", **_sections(
        mode, batch_size=4, micro_batches=micro_batches, checkpoint_every=STEPS)))
    _wait(_spawn_ranks(cfg))
    got = losses_of(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx(ref, abs=1e-5)
    marker = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert marker["step"] == STEPS and marker["world_size"] == 2
    d0, d1 = (_dense(tmp_path / "run" / f"rank-{r}" / f"ckpt-{STEPS}" / "model.safetensors") for r in (0, 1))
    one = _dense(tmp_path / "ref" / f"ckpt-{STEPS}" / "model.safetensors")
    assert d0.keys() == d1.keys() == one.keys()
    for k in d0:
        assert torch.equal(d0[k], d1[k]), k
        torch.testing.assert_close(d0[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    if mode == "tiered":  # each rank's store holds its own experts only
        for r in (0, 1):
            index = json.loads((tmp_path / "run" / f"rank-{r}" / "store" / "index.json").read_text())
            assert json.loads(index["user_meta"])["step"] == STEPS
        # `gmtier info --run` tells the ranks apart: each one's experts, RAM share, store and its step.
        r = CliRunner().invoke(main, ["info", "--run", str(tmp_path / "run"), "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        ranks = d["ranks"]
        assert [x["rank"] for x in ranks] == [0, 1]
        n_switch = len(config.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())).model.switch_layers())
        assert [a + b for a, b in zip(ranks[0]["experts_per_layer"], ranks[1]["experts_per_layer"])] == [4] * n_switch
        stores = [tmp_path / "run" / f"rank-{k}" / "store" / "experts.safetensors" for k in (0, 1)]
        assert [x["disk_bytes_actual"] for x in ranks] == [f.stat().st_size for f in stores]
        assert d["disk_bytes_actual"] == sum(f.stat().st_size for f in stores)
        assert all(x["store_committed_step"] == STEPS for x in ranks)
        assert ranks[0]["ram_budget_bytes"] == ranks[1]["ram_budget_bytes"] == d["ram_budget_bytes"] // 2
    # Evaluated in one process (each rank's experts from its checkpoint or store): the perplexity
    # of the 1-process run, and the same greedy continuation.
    evals = []
    for run in (tmp_path / "run", tmp_path / "ref"):
        cfg, model, runtime, step = load_run(run, overrides={"train": {"batch_size": 4}})  # the same batches
        try:
            assert step == STEPS
            idx = torch.tensor([[1, 2, 3]])
            evals.append((split_perplexity(cfg, model, "val", 3)["loss"], model.generate(idx, 8, 0.0, None).tolist()))
        finally:
            if runtime is not None:
                runtime.close()
    (loss_2, text_2), (loss_1, text_1) = evals
    assert loss_2 == pytest.approx(loss_1, rel=1e-4)
    assert text_2 == text_1


@pytest.mark.skipif(not _tiered_available(), reason="no ExpertStore")
def test_kill_one_rank_then_resume_matches_uninterrupted(data_dir, tmp_path):
    """kill -9 of rank 1 mid-run (after the checkpoint of step 4), then a resume of both ranks
    (through `gmtier train --nproc 2`, torchrun): the losses of the uninterrupted run."""
    steps = 12
    sections = _sections("tiered", batch_size=4, checkpoint_every=4)
    sections["train"]["steps"] = steps
    sections["model"] = dict(router_jitter=0.1)  # each rank's own noise stream, restored by the resume
    ref_cfg = _write_toml(tmp_path / "ref.toml", tiny(data_dir, tmp_path / "ref", **sections))
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", **sections))
    ref_procs = _spawn_ranks(ref_cfg)  # the uninterrupted run, beside the one to kill
    procs = _spawn_ranks(cfg)
    _wait_for_steps(procs, tmp_path / "run", 6, timeout=60)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    try:  # rank 0 fails on its next exchange with the dead rank
        procs[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].communicate()
    killed_at = max(losses_of(tmp_path / "run"))
    assert killed_at < steps
    _wait(ref_procs)
    ref = losses_of(tmp_path / "ref")

    p = _resume_two_ranks(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    got = losses_of(tmp_path / "run")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], abs=1e-6)


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(data_dir, tmp_path):
    """SIGTERM to rank 1 alone: both ranks finish the same step, checkpoint it and exit 143 (the
    flag is reduced over the ranks); a resume of both gives the uninterrupted run's losses."""
    steps = 40
    sections = _sections("resident", batch_size=4, checkpoint_every=0)
    sections["train"]["steps"] = steps
    ref_cfg = _write_toml(tmp_path / "ref.toml", tiny(data_dir, tmp_path / "ref", **sections))
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", **sections))
    ref_procs = _spawn_ranks(ref_cfg)
    procs = _spawn_ranks(cfg)
    _wait_for_steps(procs, tmp_path / "run", 6, timeout=120)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs
    stopped_at = max(losses_of(tmp_path / "run"))
    assert stopped_at < steps and f"step {stopped_at:6d} | stopped by SIGTERM" in outs[0]
    _wait(ref_procs)

    p = _resume_two_ranks(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    ref, got = losses_of(tmp_path / "ref"), losses_of(tmp_path / "run")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], abs=1e-6)


def test_each_rank_draws_its_own_router_jitter(data_dir, tmp_path):
    """With router jitter, the ranks' torch generators differ after a step (their noise is not
    one draw repeated on every rank), while the dense weights stay the same on both."""
    sections = _sections("resident", batch_size=4, checkpoint_every=2)
    sections["train"]["steps"] = 2
    sections["model"] = dict(router_jitter=0.1)
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", **sections))
    _wait(_spawn_ranks(cfg))
    ckpt = [tmp_path / "run" / f"rank-{r}" / "ckpt-2" for r in (0, 1)]
    rng = [load_file(str(c / "optim.safetensors"))["rng.torch_cpu"] for c in ckpt]
    assert not torch.equal(rng[0], rng[1])
    d0, d1 = (_dense(c / "model.safetensors") for c in ckpt)
    assert all(torch.equal(d0[k], d1[k]) for k in d0)


# A rank's process that dies (as kill -9 would: no cleanup) where rank 0 would commit its store
# for step 8, after every rank flushed it: rank 1 commits step 8, rank 0 stays at step 4.
_RANK_DIES_COMMITTING = (
    "import os, sys, torch; torch.set_num_threads(1); from gmtier.experts.runtime import ExpertRuntime\n"
    "commit = ExpertRuntime.commit\n"
    "def dies(self, meta):\n"
    "    if os.environ['RANK'] == '0' and meta['step'] == 8: os._exit(9)\n"
    "    commit(self, meta)\n"
    "ExpertRuntime.commit = dies\n"
    "from gmtier.commands import train; train(sys.argv[1:])")


@pytest.mark.skipif(not _tiered_available(), reason="no ExpertStore")
def test_kill_inside_the_commit_window_resumes_from_the_checkpoint_before(data_dir, tmp_path):
    """A kill between one rank's store commit and another's leaves the stores at different
    steps (8 and 4); the resume puts rank 1's kept commit of step 4 back and every rank goes on
    from step 4: the losses of the uninterrupted run."""
    steps = 12
    sections = _sections("tiered", batch_size=4, checkpoint_every=4)
    sections["train"]["steps"] = steps
    sections["model"] = dict(router_jitter=0.1)  # each rank's own noise stream, restored by the resume
    ref_cfg = _write_toml(tmp_path / "ref.toml", tiny(data_dir, tmp_path / "ref", **sections))
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", **sections))
    ref_procs = _spawn_ranks(ref_cfg)
    procs = _spawn_ranks(cfg, rank_code=_RANK_DIES_COMMITTING)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[0].returncode == 9 and procs[1].returncode != 0, outs
    _wait(ref_procs)

    def store_step(r):
        index = json.loads((tmp_path / "run" / f"rank-{r}" / "store" / "index.json").read_text())
        return json.loads(index["user_meta"])["step"]

    assert (store_step(0), store_step(1)) == (4, 8)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 4
    _wait(_spawn_ranks(cfg, 2, "--resume"))
    assert (store_step(0), store_step(1)) == (steps, steps)
    got, ref = losses_of(tmp_path / "run"), losses_of(tmp_path / "ref")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], abs=1e-6)


def test_resume_with_another_world_size_is_refused(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", **_sections("resident", batch_size=4, checkpoint_every=2))
    cfg.train.steps = 2
    _wait(_spawn_ranks(_write_toml(tmp_path / "run.toml", cfg)))
    with pytest.raises(CheckpointError, match=r"trained by 2 process.*this run has 1.*--nproc 2"):
        Trainer(cfg, resume=True, log=lambda m: None)
    # And the other way: a 1-process run resumed by 2 ranks (each says so and exits non-zero).
    one = tiny(data_dir, tmp_path / "one", **_sections("resident", batch_size=4, checkpoint_every=2))
    one.train.steps = 2
    train(one, log=lambda m: None)
    procs = _spawn_ranks(_write_toml(tmp_path / "one.toml", one), 2, "--resume")
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("trained by 1 process(es)" in out and "this run has 2" in out for out in outs), outs


def test_budgets_that_cannot_be_split_are_refused(tmp_path):
    cfg = tiny(Path("."), tmp_path / "run")  # 3 records of RAM for the machine: 1.5 a rank
    with pytest.raises(config.ConfigError, match=r"experts.ram_budget = .* shared by its 2 ranks.*fewer than the 2"):
        Ranks(0, 2, 0, 2, "cpu").rank_config(cfg)
    with pytest.raises(config.ConfigError, match=r"model.n_experts = 4 is less than the 8 ranks"):
        Ranks(0, 8, 0, 8, "cpu").rank_config(cfg)
    cfg.experts.ram_budget = "64MiB"
    mine = Ranks(1, 2, 1, 2, "cpu").rank_config(cfg)
    assert mine.experts.ram_budget == 32 * 2**20 and mine.model is cfg.model
    assert Path(mine.experts.store_dir) == tmp_path / "run" / "rank-1" / "store"
    assert Path(mine.train.activations_dir) == tmp_path / "run" / "rank-1" / "activations"


def test_placement_balances_experts_across_ranks_and_layers():
    assert placement(8, 2, 2) == [[0, 4, 8], [0, 4, 8]]
    bounds = placement(7, 3, 3)  # 2 or 3 experts a rank; the extra rotates
    sizes = [[b[r + 1] - b[r] for r in range(3)] for b in bounds]
    assert sizes == [[3, 2, 2], [2, 3, 2], [2, 2, 3]]
    assert all(b[0] == 0 and b[-1] == 7 for b in bounds)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("mode,micro_batches", [("resident", 1), ("tiered", 1), ("tiered", 2)])
def test_two_gpus_equal_one_gpu(data_dir, tmp_path, mode, micro_batches):
    """NCCL, tokens GPU to GPU: 2 ranks on cuda:0 and cuda:1 equal one process on cuda:0 over the
    same global batch (fp32; the expert GEMMs padded to 128 rows on both), dense part bitwise
    the same on both ranks."""
    gpu = dict(device="cuda", precision="fp32")
    s = _sections(mode, batch_size=8 if micro_batches == 1 else 4, micro_batches=1 if micro_batches == 1 else 4,
                  checkpoint_every=STEPS, **gpu)
    ref = train(tiny(data_dir, tmp_path / "ref", **s), log=lambda m: None)
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", **_sections(
        mode, batch_size=4, micro_batches=micro_batches, checkpoint_every=STEPS, **gpu)))
    _wait(_spawn_ranks(cfg), timeout=300)
    got = losses_of(tmp_path / "run")
    assert [got[k] for k in sorted(got)] == pytest.approx(ref, abs=1e-4)
    d0, d1 = (_dense(tmp_path / "run" / f"rank-{r}" / f"ckpt-{STEPS}" / "model.safetensors") for r in (0, 1))
    assert all(torch.equal(d0[k], d1[k]) for k in d0)


_OVERLAP_RANK = r'''
import os, sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from gmtier.config import ModelConfig
from gmtier.distributed import ExpertParallel, Ranks, placement
from gmtier.experts.bank import ResidentExperts
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
ranks = Ranks(rank, 2, rank, 2, "cpu")
cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=8, d_ff=16, seq_len=8, n_experts=6, switch_every=1)
ranks.switch_layers, ranks.bounds = [0], placement(6, 1, 2)
gemm = sys.argv[1]  # "grouped": the experts' dW come per call, for the experts with rows only
bank = ExpertParallel(ranks, 0, ResidentExperts(cfg, 0, 0, gemm=gemm, experts=ranks.owned(0)))
started, seen = [], []
start = ranks.start_all_to_all
ranks.start_all_to_all = lambda *a: (started.append(1), start(*a))[1]
inner = bank.inner.forward
bank.inner.forward = lambda x, c: (seen.append((len(started), sum(c))), inner(x, c))[1]
g = torch.Generator().manual_seed(rank)
counts = [[5, 0, 3, 4, 0, 2], [1, 6, 0, 2, 3, 0]][rank]  # expert 4 gets rows from rank 1 only
x = torch.randn(sum(counts), 8, generator=g)
dy = torch.randn(sum(counts), 8, generator=g)
runs = []
for chunks in (1, 2):
    bank.chunks, started[:], seen[:] = chunks, [], []
    xi = x.clone().requires_grad_()
    y = bank(xi, counts)
    y.backward(dy)
    grads = [None if p.grad is None else p.grad.clone() for p in bank.inner.parameters()]
    runs.append((y.detach(), xi.grad, grads, list(seen), len(started)))
    bank.inner.zero_grad(set_to_none=True)
(y1, dx1, g1, seen1, n1), (y2, dx2, g2, seen2, n2) = runs
assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(dx1, dx2, atol=1e-6)
assert [a is None for a in g1] == [a is None for a in g2], (g1, g2)
assert all(a is None or torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
assert n1 == 4 and n2 == 8, (n1, n2)  # forward and backward: one exchange each way, or one a group each way
assert [s for s, _ in seen2] == [2, 3], seen2  # both groups' tokens were on their way before the first computed
# The layer-major step's exchanges (outside autograd), in groups and at once: the same numbers.
lm = []
for chunks in (1, 2):
    bank.chunks, started[:], seen[:] = chunks, [], []
    y, saved = bank.step_forward(x, counts)
    dx = bank.step_backward(x, dy, counts, saved)
    lm.append((y, dx, [None if p.grad is None else p.grad.clone() for p in bank.inner.parameters()], list(seen)))
    bank.inner.zero_grad(set_to_none=True)
(y1, dx1, g1, _), (y2, dx2, g2, seen2) = lm
assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(dx1, dx2, atol=1e-6)
assert torch.allclose(y1, runs[0][0], atol=1e-6) and torch.allclose(dx1, runs[0][1], atol=1e-6)
assert [a is None for a in g1] == [a is None for a in g2] == [a is None for a in runs[0][2]], (g1, g2)
assert all(a is None or torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
assert [s for s, _ in seen2[:2]] == [2, 3], seen2  # forward: both groups' tokens sent before the first computed
dist.barrier()
dist.destroy_process_group()  # before exit: a gloo group left to the interpreter's teardown may abort it
print("OK", rank, seen2)
'''


@pytest.mark.parametrize("gemm", ["loop", "grouped"])
def test_the_exchange_by_groups_of_experts_gives_one_exchanges_numbers(gemm):
    """Two ranks on gloo, a resident bank of 3 experts each: with the tokens exchanged in two
    groups of experts (each group computing while the later ones' tokens are still on their way)
    the outputs and the gradients of the inputs and of every expert are those of one exchange,
    and the experts without tokens get no gradient."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _OVERLAP_RANK, gemm], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port)))
             for r in range(2)]
    outs = _wait(procs, timeout=120)
    assert all(out.strip().splitlines()[-1].startswith("OK") for out in outs), outs
