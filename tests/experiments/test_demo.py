"""`flythinker demo --quick` end to end on tiny models (the real default models are exercised by slow tests)."""



from flythinker.cli.main import main


def test_demo_bad_data_dir_is_one_line_error(tmp_path, capsys):
    assert main(["demo", "--quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def _demo_config(argv):
    import argparse

    from flythinker.cli.demo import add_cli, demo_config

    parser = argparse.ArgumentParser()
    add_cli(parser)
    return demo_config(parser.parse_args(argv))


def test_quick_preset_keeps_a_flag_equal_to_the_plain_default(tmp_path):
    """Regression: `--quick --train.grad_accum 4` used to be dropped because 4 is the full demo's default (the
    preset's is 2); a flag now overrides the preset whatever its value."""
    from flythinker.experiments.demo import DemoConfig, quick_preset

    plain, quick = DemoConfig(), quick_preset(DemoConfig())
    assert plain.train.grad_accum == 4 and quick.train.grad_accum == 2
    assert _demo_config(["--quick"]).train.grad_accum == 2
    assert _demo_config(["--quick", "--train.grad_accum", "4"]).train.grad_accum == 4
    assert _demo_config(["--quick", "--train_examples", str(plain.train_examples)]).train_examples == \
        plain.train_examples
    # YAML sits between the preset and the flags, and overrides only what it names
    y = tmp_path / "d.yaml"
    y.write_text("train: {grad_accum: 4}\ndata: {k: 3}\n")
    cfg = _demo_config(["--quick", "--config", str(y), "--data.k", "1"])
    assert cfg.train.grad_accum == 4 and cfg.data.k == 1 and cfg.train.lr_generator == quick.train.lr_generator
    # the shortcuts land in the nested fields
    cfg = _demo_config(["--data", "/some/dir", "--generator", "gdir", "--reasoner", "2"])
    assert cfg.data_dir == "/some/dir" and cfg.model.generator == "gdir" and cfg.model.reasoner == "2"
