"""A compiler failure costs speed, never the run: every block graph whose compilation raises runs eager after one
warning, with the eager losses; and the inductor options that avoid torch 2.11's tiling assertion reach inductor."""

import warnings

import pytest
import torch
from test_train import tiny_cfg

from fastjepa import parallel
from fastjepa import train as fj_train
from fastjepa.modules.block import Block

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
FAST = ["train.max_steps=3", "meta.pred_depth=2", "fastjepa.kernel_backend=reference"]


def fastjepa_test_failing(gm, example_inputs):
    raise AssertionError("injected: inductor's get_pw_red_splits")


def test_a_failing_compile_runs_eager_with_one_warning_per_graph_and_the_eager_losses(tmp_path, monkeypatch):
    compilers = []

    def apply_failing_compile(model, backend):
        assert backend == "inductor"  # what the trainer asks for; the injected backend stands in for it
        compilers.append(real_apply_compile(model, fastjepa_test_failing))
        return compilers[-1]

    real_apply_compile = parallel.apply_compile
    torch._dynamo.reset()
    monkeypatch.setattr(parallel, "apply_compile", apply_failing_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fj_train.run(tiny_cfg(tmp_path / "compiled", *FAST, "train.compile=true"))
    eager = fj_train.run(tiny_cfg(tmp_path / "eager", *FAST, "train.compile=false"))
    torch._dynamo.reset()

    assert sorted(compiled.losses) == sorted(eager.losses) == [1, 2, 3]
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-6, abs=0), step
    failures = compilers[0].failures
    messages = [str(w.message) for w in caught if "torch.compile (fastjepa_test_failing)" in str(w.message)]
    # target (no grad), encoder and predictor (grad), the predictor's target-only last block: at least two graphs,
    # each warned about once, naming the block, the torch version and the error
    assert len(failures) >= 2 and len(messages) == len(failures), messages
    assert all("ViT block" in m and f"torch {torch.__version__}" in m and "injected: inductor's get_pw_red_splits"
               in m and "runs eager" in m for m in messages), messages


def test_the_block_options_are_known_to_this_inductor_and_compile_a_block():
    """The options torch.compile validates (an unknown key raises), applied to a block whose token counts change
    (dynamic shapes after the first recompile, as in training) and whose last call slices the queries."""
    options = parallel.block_inductor_options()
    assert options == parallel.BLOCK_INDUCTOR_OPTIONS  # this torch (2.13) still has the analysis
    torch.manual_seed(0)
    block = Block(16, 2)
    compiler = parallel.EagerOnCompileFailure("inductor")
    compiled = torch.compile(block, backend=compiler)
    torch._dynamo.reset()
    for batch, tokens, queries_from in ((2, 9, 0), (4, 11, 0), (4, 13, 5), (4, 12, 7)):
        x = torch.randn(batch, tokens, 16)
        want = block(x, queries_from=queries_from)
        got = compiled(x, queries_from=queries_from)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert compiler.failures == []


@pytest.mark.parametrize("signal", [torch._dynamo.exc.TensorifyScalarRestartAnalysis, torch._dynamo.exc.SkipFrame])
def test_dynamo_control_flow_raised_inside_the_backend_is_not_a_failure(signal):
    """Dynamo restarts its analysis by raising from inside the backend (e.g. to trace a scalar as a tensor): the
    fallback must let that through, or the graph would run eager for no reason."""

    def restarting(gm, example_inputs):
        raise signal()

    compiler = parallel.EagerOnCompileFailure(restarting)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(signal):
        compiler(gm, [torch.zeros(1, 2)])
    assert compiler.failures == []
