"""adapter_io.py: what an adapter dir holds, and that nothing loaded is trusted before it is checked (manifest,
shape, the base it was trained on)."""
import json

import pytest


def saved_adapter(tmp_path):
    from adapter_io import save_adapter
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config
    from tiny_qwen import init_weights, save_model

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_model(init_weights(Qwen3(cfg)), str(tmp_path / "base"))
    from model import load_model

    save_adapter(add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=4, rank=2),
                              verbose=False), str(tmp_path / "ad"))
    return load_model, tmp_path / "ad"


@pytest.mark.parametrize("field, value", [("num_experts", 10 ** 9), ("rank", -2), ("rank", 0), ("top_k", "2")])
def test_a_bad_adapter_config_is_refused_before_anything_is_allocated(tmp_path, field, value):
    """A checkpoint's adapter_config.json (manifest recomputed, so the checksums pass) with a huge or invalid
    shape: a one-line ValueError naming the field, not a 512 GB allocation or a ZeroDivisionError."""
    from adapter_io import load_adapter, write_manifest

    load_model, ad = saved_adapter(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg[field] = value
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    write_manifest(str(ad))
    with pytest.raises(ValueError, match=field):
        load_adapter(load_model(str(tmp_path / "base")), str(ad))


def test_an_adapter_without_its_manifest_is_refused(tmp_path):
    """Deleting manifest.json must not switch the checksum off: the edited weights are refused, naming the file."""
    from adapter_io import load_adapter

    load_model, ad = saved_adapter(tmp_path)
    (ad / "manifest.json").unlink()
    data = bytearray((ad / "adapter.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (ad / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="manifest.json not found"):
        load_adapter(load_model(str(tmp_path / "base")), str(ad))


def test_an_adapter_is_refused_on_another_base_of_the_same_shape(tmp_path):
    """Two random bases of one config share the config hash; the fingerprint of the base's weights tells them
    apart. The same base loaded in bf16 still matches."""
    import torch

    from adapter_io import load_adapter
    from model import Qwen3, Qwen3Config, load_model
    from tiny_qwen import init_weights, save_model

    load_model_, ad = saved_adapter(tmp_path)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_model(init_weights(Qwen3(cfg), seed=1), str(tmp_path / "other"))
    with pytest.raises(ValueError, match="another base model of the same shape"):
        load_adapter(load_model(str(tmp_path / "other")), str(ad))
    load_adapter(load_model(str(tmp_path / "base"), dtype=torch.bfloat16), str(ad))


def test_the_peft_export_verifies_the_manifest_first(tmp_path):
    """adapter_io.py's export reads a checkpoint like every other loader: tampered weights are refused, naming the
    file, and nothing is written."""
    from adapter_io import export_peft, save_adapter
    from lora_moe import LoRAMoEConfig, add_lora_moe
    from model import Qwen3, Qwen3Config, load_model
    from tiny_qwen import init_weights, save_model

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_model(init_weights(Qwen3(cfg)), str(tmp_path / "base"))
    save_adapter(add_lora_moe(load_model(str(tmp_path / "base")), LoRAMoEConfig(num_experts=1, top_k=1, rank=2),
                              verbose=False), str(tmp_path / "ad"))
    export_peft(str(tmp_path / "ad"), str(tmp_path / "ok"))  # the untouched adapter exports
    data = bytearray((tmp_path / "ad" / "adapter.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "ad" / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="adapter.safetensors is missing or does not match"):
        export_peft(str(tmp_path / "ad"), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_an_adapter_larger_than_its_base_is_refused_before_it_is_allocated(tmp_path):
    """An adapter_config.json whose every value is in range (4096 experts of rank 4096; manifest recomputed) still
    asks for more parameters than the base holds: refused at once, naming the sizes, nothing allocated."""
    import time

    from adapter_io import load_adapter, write_manifest

    load_model, ad = saved_adapter(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "num_experts": 4096, "rank": 4096, "top_k": 2}))
    write_manifest(str(ad))
    t = time.perf_counter()
    with pytest.raises(ValueError, match="adapters of 4096 experts of rank 4096 would hold .* more than the base"):
        load_adapter(load_model(str(tmp_path / "base")), str(ad))
    assert time.perf_counter() - t < 5


def test_a_manifest_must_cover_every_file_the_loader_reads(tmp_path):
    """An edited adapter_config.json (alpha x 100) with its line taken out of manifest.json: refused, naming
    the file the manifest leaves out (was: the edited config loaded and chat answered with it)."""
    from adapter_io import load_adapter

    load_model, ad = saved_adapter(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "alpha": cfg["alpha"] * 100}))
    sums = json.loads((ad / "manifest.json").read_text())
    (ad / "manifest.json").write_text(json.dumps({k: v for k, v in sums.items() if k != "adapter_config.json"}))
    with pytest.raises(ValueError, match="manifest.json does not list adapter_config.json"):
        load_adapter(load_model(str(tmp_path / "base")), str(ad))
