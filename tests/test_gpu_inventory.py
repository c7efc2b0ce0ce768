"""GPU inventory: the record kept in a manifest and the rules that refuse a node."""

from __future__ import annotations

import pytest

from slurm_mm.engine import gpu_inventory
from slurm_mm.engine.gpu_inventory import Gpu, GpuInventory, check_compatible, gpu_pairs
from slurm_mm.errors import ImageCorrupt, NodeIncompatible

GiB = 1 << 30
H100 = "NVIDIA H100 80GB HBM3"
UUID_A = "GPU-8c2f4d1e-0000-1111-2222-333344445555"
UUID_B = "GPU-11111111-2222-3333-4444-555566667777"


def inventory(*names: str, driver="580.159.04", cuda=13000, free=70 * GiB, uuids=None) -> GpuInventory:
    uuids = uuids or [f"GPU-{i:08x}-0000-0000-0000-000000000000" for i in range(len(names))]
    return GpuInventory(
        driver, cuda,
        tuple(Gpu(i, uuids[i], name, 80 * GiB, free) for i, name in enumerate(names)),
    )


def test_record_round_trips_through_the_manifest_form():
    inv = inventory(H100, H100)
    record = inv.to_dict()
    assert record["count"] == 2 and record["gpus"][0]["name"] == H100
    assert "memory_free" not in record["gpus"][0]
    back = GpuInventory.from_dict(record)
    assert back.uuids == inv.uuids and back.driver_version == inv.driver_version


@pytest.mark.parametrize(
    "record, field",
    [
        ([], "mapping"),
        ({"cuda_driver_version": 13000, "gpus": []}, "driver_version"),
        ({"driver_version": "x", "cuda_driver_version": 13000, "gpus": []}, "driver_version"),
        ({"driver_version": "580.1", "cuda_driver_version": "13", "gpus": []}, "cuda_driver_version"),
        ({"driver_version": "580.1", "cuda_driver_version": 13000, "gpus": [{"index": 0}]}, "gpu entry"),
        ({"driver_version": "580.1", "cuda_driver_version": 13000, "gpus": [], "count": 2}, "count"),
    ],
)
def test_malformed_record_is_image_corrupt_naming_the_field(record, field):
    with pytest.raises(ImageCorrupt, match=field):
        GpuInventory.from_dict(record)


def test_same_node_is_compatible():
    here = inventory(H100)
    assert check_compatible(here.to_dict(), 8 * GiB, here) is here


def test_image_without_gpus_fits_anywhere():
    assert check_compatible(None, 0, None) is None
    assert check_compatible(inventory().to_dict(), 0, None) is None


def test_node_without_gpu_is_refused():
    with pytest.raises(NodeIncompatible, match=r"1 x NVIDIA H100.*no usable GPU"):
        check_compatible(inventory(H100).to_dict(), 0, GpuInventory("580.159.04", 13000, ()))


def test_other_gpu_count_is_refused():
    with pytest.raises(NodeIncompatible, match="taken on 2 GPU.*offers 1"):
        check_compatible(inventory(H100, H100), 0, inventory(H100))


def test_other_gpu_model_is_refused():
    with pytest.raises(NodeIncompatible, match="model differs.*NVIDIA A100"):
        check_compatible(inventory(H100), 0, inventory("NVIDIA A100-SXM4-80GB"))


@pytest.mark.parametrize("driver, cuda, older", [("570.86.10", 13000, "NVIDIA driver 570"), ("580.159.04", 12080, "CUDA driver 12.8")])
def test_older_driver_is_refused(driver, cuda, older):
    with pytest.raises(NodeIncompatible, match=older):
        check_compatible(inventory(H100), 0, inventory(H100, driver=driver, cuda=cuda))


def test_newer_driver_is_accepted():
    assert check_compatible(inventory(H100), 0, inventory(H100, driver="580.200.1", cuda=13010))


def test_driver_versions_compare_as_numbers_not_text():
    # "580.9" < "580.10" numerically; as text it would be the other way round.
    with pytest.raises(NodeIncompatible):
        check_compatible(inventory(H100, driver="580.10.0"), 0, inventory(H100, driver="580.9.0"))


def test_too_little_free_gpu_memory_is_refused():
    here = inventory(H100, H100, free=10 * GiB)
    with pytest.raises(NodeIncompatible, match="needs 25.0 GiB.*20.0 GiB free"):
        check_compatible(inventory(H100, H100), 25 * GiB, here)
    with pytest.raises(NodeIncompatible, match="GPU 1 .* 10.0 GiB free; image needs 12.0 GiB"):
        check_compatible(inventory(H100, H100), [1 * GiB, 12 * GiB], here)
    assert check_compatible(inventory(H100, H100), [9 * GiB, 9 * GiB], here)


def test_visible_selection_by_index_and_uuid_prefix():
    node = inventory(H100, H100, H100, uuids=[UUID_A, UUID_B, "GPU-22222222-0000-0000-0000-000000000000"])
    assert gpu_inventory.select_visible(node, "2,0").uuids == (node.uuids[2], UUID_A)
    assert gpu_inventory.select_visible(node, [UUID_B[:12]]).uuids == (UUID_B,)
    with pytest.raises(NodeIncompatible, match="'7'"):
        gpu_inventory.select_visible(node, "7")


def test_gpu_pairs_map_by_position_and_only_when_something_moves():
    old = inventory(H100, H100, uuids=[UUID_A, UUID_B])
    assert gpu_pairs(old, old) == []
    new = inventory(H100, H100, uuids=[UUID_B, UUID_A])
    pairs = gpu_pairs(old.to_dict(), new)
    assert pairs == [("8c2f4d1e000011112222333344445555", "11111111222233334444555566667777"),
                     ("11111111222233334444555566667777", "8c2f4d1e000011112222333344445555")]
    with pytest.raises(NodeIncompatible, match="not a GPU UUID"):
        gpu_inventory.uuid_hex("MIG-abc")


SMI_CSV = """0, GPU-8c2f4d1e-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 81559, 81000, 580.159.04
1, GPU-11111111-2222-3333-4444-555566667777, NVIDIA H100 80GB HBM3, 81559, [N/A], 580.159.04
"""
SMI_Q = """
Driver Version                            : 580.159.04
CUDA Version                              : 13.0
"""


def test_nvidia_smi_output_is_parsed():
    inv = gpu_inventory.parse_nvidia_smi(SMI_CSV, SMI_Q)
    assert inv.count == 2 and inv.models == (H100, H100)
    assert inv.driver_version == "580.159.04" and inv.cuda_driver_version == 13000
    assert inv.gpus[0].memory_total == 81559 << 20 and inv.gpus[0].memory_free == 81000 << 20
    assert inv.gpus[1].memory_free is None
    assert gpu_inventory.parse_nvidia_smi("", SMI_Q) is None
    with pytest.raises(NodeIncompatible, match="cannot read nvidia-smi"):
        gpu_inventory.parse_nvidia_smi("garbage", "")


def test_compute_apps_output_is_parsed():
    text = "1234, 8813\n1234, 100\n99, [N/A]\n"
    assert gpu_inventory.parse_compute_apps(text) == {1234: 8913 << 20}


def test_no_pynvml_and_no_nvidia_smi_means_no_inventory(monkeypatch):
    def missing():
        raise ImportError("no pynvml")

    monkeypatch.setattr(gpu_inventory, "_import_pynvml", missing)
    monkeypatch.setattr(gpu_inventory.shutil, "which", lambda name: None)
    assert gpu_inventory.read_inventory() is None
    assert gpu_inventory.process_gpu_memory() == {}
