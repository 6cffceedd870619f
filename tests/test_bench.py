"""`python -m lexjax.bench`: measured rows on 8 fake CPU devices, and compiler estimates for a TPU
topology compiled ahead of time with libtpu (skipped only where libtpu is not installed)."""
import importlib.util
import json
import os

import gin
import pytest

from lexjax import bench
from lexjax.benchmarking import topology as topo
from lexjax.config import ConfigError, parse_gin
from lexjax.runs import configured_training
from lexjax.partitioning import MeshError

TINY = ["--gin.NUM_LAYERS=2", "--gin.EMBED_DIM=64", "--gin.NUM_HEADS=4", "--gin.MLP_DIM=128"]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'lexjax[tpu]'); TPU AOT estimates need it")


def _rows(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "bench.json")) as f:
        return json.load(f)["rows"]


def test_the_bench_reads_the_trainers_model_and_config():
    """The bench reads the run exactly as the trainer does: the model and TrainConfig the run gin
    binds to `lexjax.training.train`; a gin without a run is a clear error."""
    parse_gin(["configs/runs/quickstart.gin"], ["BATCH_SIZE=8", "MESH='fsdp:-1'"])
    try:
        model, config = configured_training()
        assert (config.batch_size, config.mesh, config.seed) == (8, "fsdp:-1", 0)
        assert (config.train_length, config.data.task) == (128, "lexjax.stdlib_code")
        assert type(model).__name__ == "Transformer"
        parse_gin(["configs/models/transformer.gin"])
        with pytest.raises(ConfigError, match="run gin"):
            configured_training()
    finally:
        gin.clear_config()


def test_measured_mfu_stays_below_one_when_the_peak_was_measured_busy():
    """A measured CPU peak that a step beats (the host was busier when the peak was taken, or
    one device used the cores worse than the mesh does) rises to the step's rate, and the row
    says so; a CPU mesh's peak is the better of one device's and all its devices' at once."""
    import jax
    from lexjax import partitioning
    from lexjax.benchmarking.measure import mesh_peak_flops, mesh_utilization
    source = "measured cpu f32 matmul rate"
    mfu, peak, why = mesh_utilization(300.0, 1.0, (100.0, source))
    assert (mfu, peak) == (1.0, 300.0) and "raised" in why
    assert mesh_utilization(50.0, 1.0, (100.0, source)) == (0.5, 100.0, source)
    mesh = partitioning.make_mesh("data:2", jax.devices()[:2])
    peak, why = mesh_peak_flops(mesh, (1.0, source))
    assert peak > 1.0 and "2 CPU devices at once" in why


def test_measured_bench_writes_rows_that_agree(tmp_path):
    meshes = ["data:8", "fsdp:8"]
    argv = ["--gin_file=configs/runs/quickstart.gin", *TINY, "--gin.BATCH_SIZE=8",
            "--gin.TRAIN_LENGTH=32", *[f"--mesh={m}" for m in meshes], "--steps=2",
            f"--out={tmp_path}"]
    assert bench.main(argv) == 0
    for ext in ("json", "csv", "md", "png"):
        assert os.path.getsize(tmp_path / f"bench.{ext}") > 0
    rows = {r["mesh"]: r for r in _rows(tmp_path)}
    assert list(rows) == meshes
    losses = [rows[m]["loss"] for m in meshes]
    assert max(losses) - min(losses) < 1e-5 * losses[0]
    for row in rows.values():
        assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
        assert row["compile_seconds"] > 0 and row["temp_bytes"] >= 0
    assert rows["fsdp:8"]["state_bytes_per_device"] < rows["data:8"]["state_bytes_per_device"] / 3
    assert "| fsdp:8 |" in (tmp_path / "bench.md").read_text()


def test_bad_mesh_and_topology_are_clear_errors(tmp_path):
    with pytest.raises(MeshError, match="bad mesh item"):
        bench.main(["--gin_file=configs/runs/quickstart.gin", *TINY, "--mesh=rows:8",
                    f"--out={tmp_path}"])
    with pytest.raises(MeshError, match="v5e:2x2"):
        topo.parse_topology("v5litepod-16")


def test_fake_cpu_devices_keeps_an_explicit_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    bench.fake_cpu_devices(["data:16"])
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    bench.fake_cpu_devices(["data:4,tensor:4", "fsdp:-1"])
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=16"


def test_hbm_overflow_parses_the_compiler_message():
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
               "memory required for HLO temporaries (26.84G) exceeds available HBM (15.75G).")
    needed, available = topo.hbm_overflow(message)
    assert needed == pytest.approx(26.84 * 2 ** 30) and available == pytest.approx(15.75 * 2 ** 30)
    assert topo.hbm_overflow("INTERNAL: something else") is None


def test_estimated_seconds_prefers_the_compiler_then_the_roofline():
    chip = topo.CHIPS["v5e"]
    assert topo.estimated_seconds({"optimal_seconds": 2e-3, "flops": 1.0}, chip) == (
        2e-3, "compiler optimal_seconds")
    flops_bound = {"optimal_seconds": -24.0, "flops": 197e12, "bytes accessed": 819e6}
    assert topo.estimated_seconds(flops_bound, chip) == (1.0, "roofline of cost_analysis")
    memory_bound = {"flops": 197e9, "bytes accessed": 1638e9}
    assert topo.estimated_seconds(memory_bound, chip)[0] == pytest.approx(2.0)
    assert topo.estimated_seconds({}, chip)[0] is None


def test_while_loops_are_counted():
    hlo = "%w = (s32[], f32[4]) while(%t), condition=%c, body=%b\n%x = f32[4] add(%a, %a)"
    assert topo.while_loops(hlo) == 1 and topo.while_loops("%x = f32[4] add(%a, %a)") == 0


def test_an_estimate_is_never_faster_than_the_models_flops_at_peak():
    chip = topo.CHIPS["v5e"]
    one_second = chip.peak_flops  # model FLOPs per chip that take 1 s at peak
    assert topo.no_faster_than_peak(2.0, "compiler optimal_seconds", one_second, chip, 0) == \
        (2.0, "compiler optimal_seconds")
    seconds, source = topo.no_faster_than_peak(0.25, "roofline of cost_analysis", one_second,
                                               chip, 3)
    assert seconds == 1.0 and "3 while loops" in source and "0.25 s" in source


def test_pallas_kernels_are_named():
    text = ('%1 = stablehlo.custom_call @tpu_custom_call(%arg1) {backend_config = "{}", '
            'kernel_name = "flash_fwd", x = 1}\n%2 = stablehlo.custom_call @Sharding(%1)')
    assert topo.pallas_kernels(text) == ["flash_fwd"]


@needs_libtpu
def test_quickstart_compiles_for_v5e_2x2_on_four_meshes(tmp_path):
    meshes = ["data:4", "fsdp:4", "data:2,tensor:2", "tensor:4"]
    argv = ["--gin_file=configs/runs/quickstart.gin", *TINY, "--topology=v5e:2x2",
            *[f"--mesh={m}" for m in meshes], f"--out={tmp_path}"]
    assert bench.main(argv) == 0
    rows = {r["mesh"]: r for r in _rows(tmp_path)}
    assert list(rows) == meshes
    for row in rows.values():
        assert row["fits_hbm"] is True and row["chips"] == 4
        assert row["flops_per_chip"] > 0 and row["bytes_accessed_per_chip"] > 0
        assert row["est_step_seconds"] > 0 and row["est_tokens_per_sec"] > 0
        assert 0 < row["est_mfu"] <= 1
        assert row["kernels"] == "none (XLA only)" and row["est_source"]
    assert rows["fsdp:4"]["state_bytes_per_device"] < rows["data:4"]["state_bytes_per_device"] / 3
    assert os.path.getsize(tmp_path / "bench.png") > 0


@needs_libtpu
@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5p:2x2x1", "v6e:2x2"])
def test_pallas_attention_runs_in_the_sharded_step_of_every_tpu_generation(tmp_path, topology):
    """attention_impl="pallas" picks the Mosaic kernels for the TPU being compiled for (the host
    is a CPU), per device inside shard_map, on batch- and head-sharded meshes; v4 needs the
    column layout of the per-row statistics; v5p and v6e's optimized programs cannot be printed
    (the loop count then comes from the lowered step)."""
    meshes = ["data:4", "data:2,tensor:2"]
    argv = ["--gin_file=configs/runs/quickstart.gin", *TINY, "--gin.TRAIN_LENGTH=256",
            "--gin.BATCH_SIZE=4", "--gin.DTYPE='bfloat16'",
            "--gin.lexjax.models.Transformer.attention_impl='pallas'", f"--topology={topology}",
            *[f"--mesh={m}" for m in meshes], f"--out={tmp_path}"]
    assert bench.main(argv) == 0
    for row in _rows(tmp_path):
        assert row["kernels"] == "lexjax_attention_dkv,lexjax_attention_dq,lexjax_attention_fwd"
        assert 0 < row["est_mfu"] <= 1 and row["est_step_seconds"] > 0
        assert row["while_loops"] == 0


@needs_libtpu
def test_a_model_too_big_for_the_chip_says_by_how_much(tmp_path):
    """State alone over HBM (checked before compiling), and activations over HBM (the TPU
    compiler's own verdict)."""
    state = ["--gin.NUM_LAYERS=2", "--gin.EMBED_DIM=8192", "--gin.MLP_DIM=32768",
             "--gin.NUM_HEADS=64"]
    activations = ["--gin.BATCH_SIZE=4096", "--gin.TRAIN_LENGTH=2048"]
    for extra in (state, activations):
        argv = ["--gin_file=configs/runs/quickstart.gin", *extra, "--topology=v5e:2x2",
                "--mesh=data:4", f"--out={tmp_path}"]
        assert bench.main(argv) == 0
        (row,) = _rows(tmp_path)
        assert row["fits_hbm"] is False
        assert "does not fit" in row["hbm_note"] and "by " in row["hbm_note"], row["hbm_note"]


@needs_libtpu
def test_a_mesh_larger_than_the_topology_is_a_clear_error(tmp_path):
    with pytest.raises(MeshError, match="4 are available"):
        bench.main(["--gin_file=configs/runs/quickstart.gin", *TINY, "--topology=v5e:2x2",
                    "--mesh=data:8", f"--out={tmp_path}"])
