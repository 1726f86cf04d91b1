"""Config: presets, YAML files, --set overrides, and errors that name the file and the key path."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config.load import ConfigError, list_presets
from pipeline.config.root import Config, dump_config, flatten_config, load_config

SHIPPED = {"local", "smoke", "vit7b", "vit_small", "vit_base", "vit_large"}


def test_every_shipped_preset_loads_and_describes_itself():
    presets = list_presets()
    assert SHIPPED <= set(presets)
    for name, description in presets.items():
        config = load_config(name)
        assert isinstance(config, Config) and config.name == name
        assert description, f"preset {name} has no description line"


def test_default_is_the_local_preset():
    assert load_config(None).name == "local"


def test_set_overrides_are_typed():
    config = load_config("smoke", ["run.seed=7", "evaluate.knn_temperature=0.1", "ray.dashboard=true",
                                   "evaluate.knn_k=[5, 7]", "storage.endpoint_url=http://127.0.0.1:1"])
    assert config.run.seed == 7 and config.evaluate.knn_temperature == 0.1 and config.ray.dashboard is True
    assert config.evaluate.knn_k == [5, 7] and config.storage.endpoint_url == "http://127.0.0.1:1"


def test_unknown_key_in_a_file_names_the_file_and_the_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: smoke\ncurate:\n  sample:\n    targett: 10\n")
    with pytest.raises(ConfigError, match=rf"{path}: curate.sample.targett: unknown key"):
        load_config(str(path))


def test_wrong_type_names_the_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: smoke\nshard:\n  samples_per_shard: lots\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: shard.samples_per_shard: .*integer.*'lots'"):
        load_config(str(path))


def test_a_sampling_target_is_a_whole_count_or_a_fraction_up_to_one():
    assert load_config("smoke", ["curate.sample.target=300"]).curate.sample.target == 300
    everything = load_config("smoke", ["curate.sample.target=1.0"]).curate.sample.target
    assert isinstance(everything, float) and everything == 1.0  # every image, not one image
    with pytest.raises(ConfigError, match=r"curate.sample.target: .*1.5 is neither a fraction of the pool \(at most "
                                          r"1.0\) nor a count .*e.g. 2\)"):
        load_config("smoke", ["curate.sample.target=1.5"])


def test_a_near_duplicate_threshold_of_one_is_refused_not_a_silent_off_switch():
    assert load_config("smoke", ["curate.dedup.threshold=0.999"]).curate.dedup.threshold == 0.999
    with pytest.raises(ConfigError, match=r"curate.dedup.threshold: .*less than 1"):
        load_config("smoke", ["curate.dedup.threshold=1.0"])


def test_cluster_levels_shrink_upwards_and_level_one_trains_on_enough_points_to_resample():
    assert [level.k for level in load_config("smoke").curate.cluster.levels] == [16, 4]
    with pytest.raises(ConfigError, match=r"curate.cluster.levels: .*levels\[1\] has k = 40, not fewer than the 4 of "
                                          r"levels\[0\]: each level clusters the centroids of the level below"):
        load_config("smoke", ["curate.cluster.levels=[{k: 4}, {k: 40}]"])
    with pytest.raises(ConfigError, match=r"levels\[2\] has k = 8, not fewer than the 8"):
        load_config("smoke", ["curate.cluster.levels=[{k: 64}, {k: 8}, {k: 8}]"])
    with pytest.raises(ConfigError, match=r"curate.cluster.max_points_per_centroid: .*greater than or equal to 4"):
        load_config("smoke", ["curate.cluster.max_points_per_centroid=1"])


def test_a_value_that_fits_no_member_of_a_union_is_one_entry_naming_each_rule():
    assert load_config("smoke", ["curate.embed.actors=4"]).curate.embed.actors == 4
    assert load_config("smoke").curate.embed.gpus_per_actor == "auto"
    with pytest.raises(ConfigError) as caught:
        load_config("smoke", ["curate.embed.actors=0", "curate.embed.gpus_per_actor=lots"])
    assert str(caught.value).endswith(
        ": curate.embed.actors: Input should be greater than or equal to 1 or 'auto' (got 0); "
        "curate.embed.gpus_per_actor: Input should be a valid number, unable to parse string as a number or "
        "'auto' (got 'lots')")


def test_unknown_key_in_set_names_the_path():
    with pytest.raises(ConfigError, match=r"--set shard.nope=1: unknown key 'shard.nope'"):
        load_config("smoke", ["shard.nope=1"])
    with pytest.raises(ConfigError, match=r"expected KEY.PATH=VALUE"):
        load_config("smoke", ["shard.samples_per_shard"])


def test_missing_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="config file nowhere/x.yaml does not exist"):
        load_config("nowhere/x.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'vit9b'; shipped presets: .*local"):
        load_config("vit9b")


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("curate:\n  sources: [a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load_config(str(path))


def test_a_file_extends_a_preset_and_takes_its_own_name(tmp_path):
    path = tmp_path / "exp1.yaml"
    path.write_text("base: smoke\nrun:\n  seed: 3\n")
    config, smoke = load_config(str(path)), load_config("smoke")
    assert config.name == "exp1" and config.run.seed == 3
    assert config.shard == smoke.shard and config.model == smoke.model


def test_secrets_are_masked_in_the_saved_config_and_params():
    config = load_config("smoke", ["storage.secret=hunter2", "storage.key=AKIA123"])
    saved = yaml.safe_load(dump_config(config))
    assert saved["storage"]["secret"] == "***" and saved["storage"]["key"] == "***"
    params = flatten_config(config)
    assert params["storage.secret"] == "***" and "hunter2" not in str(params)
    assert params["shard.samples_per_shard"] == str(config.shard.samples_per_shard)


def test_only_secrets_are_masked_and_the_saved_config_loads_back_the_same():
    from pipeline.config.root import load_saved_config

    config = load_config("smoke", ["model.n_storage_tokens=2", "storage.secret=hunter2"])
    saved = load_saved_config("config.yaml", dump_config(config))
    assert flatten_config(config)["model.n_storage_tokens"] == "2"  # a word of its name is not "token"
    assert saved.model.n_storage_tokens == 2 and saved.storage.secret is None  # the environment fills secrets
    assert saved.model_copy(update={"storage": config.storage}) == config


def test_settings_that_only_decide_how_work_runs_leave_the_fingerprints_alone(tmp_path):
    from pipeline.stages import pipeline_engine

    def fingerprints(*sets: str) -> dict[str, str]:
        return pipeline_engine(load_config("smoke", list(sets)), str(tmp_path / "run")).fingerprints

    before = fingerprints()
    how = ["curate.embed.batch_size=7", "curate.embed.actors=3", "curate.embed.cpus_per_actor=2",
           "curate.embed.gpus_per_actor=1", "curate.cluster.assign_gpus=1", "shard.shards_per_task=9", "shard.stat_batch=5",
           "shard.upload_attempts=2", "shard.upload_backoff_s=3", "evaluate.batch_size=8", "evaluate.device=cpu",
           "evaluate.threads=1"]
    assert fingerprints(*how) == before
    for what, stale in (("curate.embed.chunk_size=7", {"curate", "shard"}), ("shard.samples_per_shard=9", {"shard"}),
                        ("evaluate.knn_k=[3]", {"evaluate"})):  # evaluate reads no upstream output yet
        changed = fingerprints(*how, what)
        assert {s for s in before if changed[s] != before[s]} == stale, what
    # a section whose execution settings are at their defaults hashes as its plain dump: run dirs made
    # before these settings were set apart are still done
    config = load_config("smoke")
    for section in ("curate", "shard", "evaluate"):
        assert getattr(config, section).fingerprint_view() == config.model_dump(mode="json")[section]
    # the same settings are the execution keys, named as the flattened params name them (MLflow keeps
    # them in tags that each attempt updates)
    assert config.execution_keys() == {s.split("=")[0] for s in how} <= set(flatten_config(config))
