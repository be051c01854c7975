import hashlib
import pickle
import shutil

import pytest
import torch
from evalruns import make_run, rewrite_manifest, tamper

from eval.checkpoints import BadCheckpoint, load_network, load_run_config, verify
from trainer import checkpoint, config
from trainer.config import ConfigError
from trainer.store import open_store

RUN = "tiny"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    make_run(open_store(str(root)), RUN, [1, 2, 3])
    return root


@pytest.fixture
def store(pristine, tmp_path):
    """A run with complete checkpoints at steps 1, 2 and 3, for this test alone to damage."""
    shutil.copytree(pristine, tmp_path / "store")
    return open_store(str(tmp_path / "store"))


def prefix(step):
    return checkpoint.checkpoint_prefix(RUN, step)


def assert_one_line(error):
    assert "\n" not in str(error) and str(error)


def test_verified_checkpoint_rebuilds_the_network_with_its_ema_weights(store, monkeypatch):
    # Nothing read from the store may be unpickled: every unpickler fails the test if it is reached.
    for module, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{module.__name__}.{name} was called"))
    manifest = verify(store, RUN, 2)
    assert manifest == checkpoint.read_manifest(store, RUN, 2)
    loaded = load_network(store, RUN, 2)
    assert loaded.ema == "power-0.050"  # the first power EMA by name
    assert (loaded.step, loaded.images_seen, loaded.data, loaded.resolution, loaded.channels) == (2, 16, "pixels8",
                                                                                                  32, 3)
    assert (loaded.num_classes, loaded.null_class, loaded.latent) == (10, 10, None)
    assert not loaded.net.training
    weights = checkpoint.load_ema(store, RUN, 2, "power-0.050")
    assert weights.keys() == loaded.net.state_dict().keys()
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in weights.items())
    other = load_network(store, RUN, 2, ema="power-0.100")
    assert other.ema == "power-0.100"
    assert not torch.equal(next(other.net.parameters()), next(loaded.net.parameters()))
    with pytest.raises(ValueError, match="no EMA weights 'decay-0.9999'; it has: power-0.050, power-0.100"):
        load_network(store, RUN, 2, ema="decay-0.9999")


@pytest.mark.parametrize("name", ["rank-00000.pt", "ema-power-0.100.safetensors", "data-00000.json"])
def test_a_tampered_file_is_a_bad_checkpoint_naming_the_file(store, name):
    tamper(store, prefix(2) + name)
    with pytest.raises(BadCheckpoint, match=f"{prefix(2)}{name} does not match the manifest") as e:
        verify(store, RUN, 2)
    assert_one_line(e.value)
    verify(store, RUN, 1)  # the others are untouched


def test_tampered_ema_weights_are_refused_by_the_loader_too(store):
    tamper(store, prefix(2) + "ema-power-0.050.safetensors")
    with pytest.raises(BadCheckpoint, match="ema-power-0.050.safetensors"):
        load_network(store, RUN, 2)


def test_a_missing_listed_file_is_a_bad_checkpoint(store):
    store.delete(prefix(2) + "rng-00000.pt")
    with pytest.raises(BadCheckpoint, match="rng-00000.pt is listed in the manifest but missing"):
        verify(store, RUN, 2)


def test_checkpoint_without_manifest_is_bad_and_the_error_lists_the_complete_steps(store):
    store.delete(prefix(2) + checkpoint.MANIFEST)
    for step in (2, 7):
        with pytest.raises(BadCheckpoint, match=f"no complete checkpoint at step {step} .*complete steps: 1, 3$") as e:
            verify(store, RUN, step)
        assert_one_line(e.value)
        with pytest.raises(BadCheckpoint, match=f"step {step}"):
            load_network(store, RUN, step)


@pytest.mark.parametrize("name", ["../other-run/x", "/etc/passwd", "sub/x", "..", ""])
def test_manifest_entry_outside_the_checkpoint_folder_is_refused(store, name):
    # The entry's digest is right, so only the name can make it fail.
    store.put("other-run/x", b"secret")
    rewrite_manifest(store, RUN, 2, lambda m: m["files"].__setitem__(
        name, {"size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}))
    with pytest.raises(BadCheckpoint, match="a file outside the checkpoint's folder"):
        verify(store, RUN, 2)
    with pytest.raises(BadCheckpoint, match="outside"):
        load_network(store, RUN, 2)


def test_checkpoint_of_pickles_only_is_refused(store):
    def drop_ema(manifest):
        for name in [n for n in manifest["files"] if n.startswith("ema-")]:
            del manifest["files"][name]
            store.delete(prefix(2) + name)

    rewrite_manifest(store, RUN, 2, drop_ema)
    with pytest.raises(BadCheckpoint, match=r"lists no ema-\*.safetensors weights .*rank-00000.pt") as e:
        verify(store, RUN, 2)
    assert_one_line(e.value)
    with pytest.raises(BadCheckpoint, match="safetensors only"):
        load_network(store, RUN, 2)


def test_unreadable_manifest_is_a_bad_checkpoint(store):
    store.put(prefix(2) + checkpoint.MANIFEST, b"{not json")
    with pytest.raises(BadCheckpoint, match="manifest.json is not a checkpoint manifest"):
        verify(store, RUN, 2)


def edit_config(store, edit):
    data = config.to_dict(load_run_config(store, RUN))
    edit(data)
    store.put(f"{RUN}/config.yaml", config.yaml.safe_dump(data).encode())


def test_config_that_cannot_rebuild_the_network_is_a_config_error(store):
    edit_config(store, lambda d: d["network"]["overrides"].update(no_such_field=1))
    with pytest.raises(ConfigError, match="tiny/config.yaml: .*no_such_field") as e:
        load_network(store, RUN, 2)
    assert_one_line(e.value)


def test_config_of_another_network_than_the_weights_is_a_config_error(store):
    # It builds a network, but not the one the weights belong to.
    edit_config(store, lambda d: d["network"]["overrides"].update(transformer_depth=2))
    with pytest.raises(ConfigError, match=r"does not rebuild the network of tiny/checkpoints/000000002/") as e:
        load_network(store, RUN, 2)
    assert_one_line(e.value)


@pytest.mark.parametrize("raw", [b"network: [unclosed", b"- a list\n", b"total_images: -1\n"])
def test_unparsable_or_invalid_config_is_a_config_error(store, raw):
    store.put(f"{RUN}/config.yaml", raw)
    with pytest.raises(ConfigError, match="tiny/config.yaml") as e:
        load_run_config(store, RUN)
    assert_one_line(e.value)


def test_missing_config_is_a_config_error(store):
    store.delete(f"{RUN}/config.yaml")
    with pytest.raises(ConfigError, match="tiny/config.yaml not found"):
        load_network(store, RUN, 2)


def test_sigma_rel_loads_weights_synthesised_from_snapshots_up_to_the_step(store):
    loaded = load_network(store, RUN, 2, sigma_rel=0.07)
    assert loaded.ema == "posthoc-0.070" and loaded.step == 2
    up_to_step = checkpoint.synthesize_ema(store, RUN, 0.07, [1, 2])
    with_later = checkpoint.synthesize_ema(store, RUN, 0.07, [1, 2, 3])
    state = loaded.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in up_to_step.items())
    assert not all(torch.equal(state[k], v) for k, v in with_later.items())
    # and it is neither of the tracked averages
    for name in ("power-0.050", "power-0.100"):
        tracked = checkpoint.load_ema(store, RUN, 2, name)
        assert not all(torch.equal(state[k], v) for k, v in tracked.items())


def test_latent_run_without_a_readable_index_names_it(tmp_path):
    store = open_store(str(tmp_path / "store"))
    make_run(store, RUN, [1], overrides=("network.preset=uvit_latent_tiny", "network.overrides={resolution: 16}",
                                         f"data.index={tmp_path}/latents"))
    with pytest.raises(ConfigError, match=f"latent shard index '{tmp_path}/latents' .*cannot be read") as e:
        load_network(store, RUN, 1)
    assert_one_line(e.value)
