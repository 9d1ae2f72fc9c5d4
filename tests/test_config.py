"""The config file all four scripts read, and the helper block they share."""

import ast
import os
import re
import signal
import sys

import pytest

from testbed import BIN, load_script

SCRIPTS = ["pg_wal_fetch", "pg_zfs_snap", "pg_zfs_restore", "setup_guest"]
EXAMPLE = os.path.join(os.path.dirname(BIN), "etc", "pg_zfs.conf.example")


def source_of(script):
    with open(os.path.join(BIN, script + ".py")) as handle:
        return handle.read()


def shared_block(script):
    """The config/logging/run block: from its heading to the end of run()."""
    source = source_of(script)
    start = source.index("# The helpers every pg_zfs script carries")
    after_run = source.index("\ndef run(")
    end = min(source.index(mark, after_run) for mark in ("\ndef ", "\n# ---") if mark in source[after_run:])
    return source[start:end]


def set_format_block(script):
    """The snapshot-set format block, heading to end marker."""
    source = source_of(script)
    start = source.index("# The snapshot-set format: ")
    end = source.index("# End of the snapshot-set format block.")
    return source[start:end]


def test_the_shared_helper_block_is_the_same_in_all_four_scripts():
    blocks = {script: shared_block(script) for script in SCRIPTS}
    assert len(set(blocks.values())) == 1, "the shared block differs: %s" % sorted(
        script for script in SCRIPTS if blocks[script] != blocks[SCRIPTS[0]])


def test_the_set_format_block_is_the_same_in_the_writer_and_the_reader():
    assert set_format_block("pg_zfs_snap") == set_format_block("pg_zfs_restore")
    assert "\ndef group_sets(" in set_format_block("pg_zfs_snap")


def top_level(script):
    """{name: source text} of the script's top-level functions and classes, and
    {NAME: value's source} of its upper-case constants."""
    source = source_of(script)
    lines = source.splitlines()
    functions, constants = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = node.lineno - 1 - len(node.decorator_list)
            functions[node.name] = "\n".join(lines[start:node.end_lineno])
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.isupper():
            constants[node.targets[0].id] = ast.dump(node.value)
    return functions, constants


# Each script's own entry points and identity: the same name, one role, by design.
OWN_PER_SCRIPT = ("main", "parse_args", "PROG", "CONFIG_READS")


@pytest.mark.skipif(sys.version_info < (3, 8), reason="end_lineno needs Python 3.8")
def test_a_name_means_one_thing_across_the_four_scripts():
    """A function, class or constant defined in two scripts is the same text in
    both (constants: the same value); only the entry points (main, parse_args,
    cmd_* of each script's own subcommands) and PROG/CONFIG_READS differ."""
    seen_functions, seen_constants, differing = {}, {}, []
    for script in SCRIPTS:
        functions, constants = top_level(script)
        for kind, found, seen in (("def", functions, seen_functions), ("constant", constants, seen_constants)):
            for name, text in found.items():
                if name in OWN_PER_SCRIPT or name.startswith("cmd_"):
                    continue
                if name in seen and seen[name][1] != text:
                    differing.append("%s %s: %s.py and %s.py" % (kind, name, seen[name][0], script))
                seen.setdefault(name, (script, text))
    assert differing == []


@pytest.fixture(scope="module")
def script():
    return load_script("pg_zfs_snap")


def write(tmp_path, text):
    path = tmp_path / "pg_zfs.conf"
    path.write_text(text)
    return str(path)


def test_example_config_parses_and_documents_the_required_sections(script):
    config = script.Config.load(EXAMPLE)
    for section in ["postgres", "snapshot", "archive", "guest", "host"]:
        assert config.has_section(section)
    assert config.list("snapshot", "datasets") == ["zp1/data01", "zp1/data02", "zp1/data03",
                                                   "zp1/data04"]
    assert config.str("source host25", "host") == "172.16.18.25"
    assert config.str("host", "domain") == "centos6_6_x64"


def test_missing_file_names_the_file(script, tmp_path):
    with pytest.raises(script.Failure) as caught:
        script.Config.load(str(tmp_path / "nope.conf"))
    assert caught.value.code == 2
    assert "nope.conf" in str(caught.value)


def test_missing_required_key_names_file_section_and_key(script, tmp_path):
    config = script.Config.load(write(tmp_path, "[postgres]\nuser = postgres\n"))
    with pytest.raises(script.Failure) as caught:
        config.str("postgres", "pgdata")
    assert caught.value.code == 2
    assert re.search(r"pg_zfs.conf: \[postgres\] pgdata: missing", str(caught.value))


def test_bad_number_names_the_key_and_the_value(script, tmp_path):
    with pytest.raises(script.Failure) as caught:
        script.Config.load(write(tmp_path, "[archive]\ntimeout = soon\n"))
    assert "pg_zfs.conf: [archive] timeout: 'soon' is not a whole number" in str(caught.value)
    assert caught.value.code == 2
    config = script.Config.load(write(tmp_path, "[archive]\ntimeout = -5\n"))
    with pytest.raises(script.Failure) as caught:
        config.int("archive", "timeout", 60, minimum=1)
    assert "[archive] timeout: -5 is below the minimum 1" in str(caught.value)


def test_unknown_backend_lists_the_choices(script, tmp_path):
    with pytest.raises(script.Failure) as caught:
        script.Config.load(write(tmp_path, "[snapshot]\nbackend = lvm\n"))
    assert "[snapshot] backend: 'lvm' is not one of zfs, btrfs" in str(caught.value)


@pytest.mark.parametrize("script_name, text, message", [
    ("pg_zfs_snap", "[snapshot]\nkeep_dayly = 30\n", "[snapshot] keep_dayly: no such key (did you mean keep_daily?)"),
    ("pg_zfs_snap", "[snapshot]\nprefx = a\n", "[snapshot] prefx: no such key (did you mean prefix?)"),
    ("pg_zfs_restore", "[restor]\nmount_root = /x\n", "[restor]: no such section (did you mean restore?)"),
    ("pg_zfs_restore", "[restore]\nmount_roo = /x\n", "[restore] mount_roo: no such key (did you mean mount_root?)"),
    ("pg_wal_fetch", "[source a]\nhots = x\n", "[source a] hots: no such key (did you mean host?)"),
    ("pg_wal_fetch", "[archive]\nstal_timeout = 3\n", "[archive] stal_timeout: no such key (did you mean stall_timeout?)"),
    ("setup_guest", "[gust]\nwaldir = /x\n", "[gust]: no such section (did you mean guest?)"),
    ("setup_guest", "[bogus]\n", "[bogus]: no such section"),
    ("pg_zfs_snap", "[snapshot]\nwarn_age = a day\n", "[snapshot] warn_age: 'a day' is not a duration"),
    ("pg_zfs_snap", "[replica r1]\ntarge = bk/g1\n", "[replica r1] targe: no such key (did you mean target?)"),
    ("pg_zfs_snap", "[replika r1]\nhost = x\n", "[replika r1]: no such section (did you mean replica NAME?)"),
])
def test_a_typo_is_refused_naming_file_section_key_and_the_nearest_valid_name(script_name, text, message, tmp_path):
    script = load_script(script_name)
    with pytest.raises(script.Failure) as caught:
        script.Config.load(write(tmp_path, text))
    assert caught.value.code == 2
    assert str(caught.value).startswith(str(tmp_path / "pg_zfs.conf") + ": " + message.split(" (")[0])
    assert message in str(caught.value)


def test_a_typo_in_a_section_a_script_does_not_read_is_left_to_the_scripts_that_do(tmp_path):
    # The restore_command must not stop over a typo in the restore's section.
    path = write(tmp_path, "[restore]\nmount_roo = /x\n[restor]\n")
    assert load_script("pg_wal_fetch").Config.load(path).has_section("restore")
    with pytest.raises(Exception):
        load_script("pg_zfs_restore").Config.load(path)


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_every_key_of_the_example_config_is_in_the_schema_and_every_schema_key_in_the_example(script_name):
    script = load_script(script_name)
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(EXAMPLE)
    documented = set((script.schema_section(section), key) for section in parser.sections()
                     for key in parser.options(section))
    schema = set((section, key) for section, keys in script.CONFIG_SCHEMA.items() for key in keys)
    assert documented == schema
    assert script.Config.load(EXAMPLE)


def test_every_key_a_script_reads_is_in_the_schema():
    import glob
    for path in glob.glob(os.path.join(BIN, "*.py")):
        source = open(path).read()
        script = load_script(os.path.basename(path)[:-3])
        for section, key in re.findall(r'\.(?:str|int|choice|list|duration)\(\s*"(\w+)",\s*"(\w+)"', source):
            assert section in script.CONFIG_READS, (path, section, key)
            if key.endswith("_"):          # "keep_" + rule
                assert [name for name in script.CONFIG_SCHEMA[section] if name.startswith(key)], key
                continue
            assert key in script.CONFIG_SCHEMA[section], (path, section, key)
        for key in re.findall(r'config\.\w+\(section,\s*"(\w+)"', source):
            assert key in script.CONFIG_SCHEMA["source"], (path, key)
        for key in re.findall(r'config\.\w+\(replica_section,\s*"(\w+)"', source):
            assert "replica" in script.CONFIG_READS, (path, key)
            assert key in script.CONFIG_SCHEMA["replica"] or (
                key.endswith("_") and [name for name in script.CONFIG_SCHEMA["replica"] if name.startswith(key)]), key


@pytest.mark.parametrize("text, seconds", [("93600", 93600), ("26h", 93600), ("2d", 172800), ("90m", 5400),
                                           ("1w", 604800), ("30s", 30), (" 2D ", 172800)])
def test_durations_take_units(script, text, seconds):
    assert script.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2x", "-1h", "1.5h", "2 d"])
def test_a_duration_without_a_number_or_with_an_unknown_unit_is_none(script, text):
    assert script.parse_duration(text) is None


def test_defaults_apply_when_a_key_is_absent(script, tmp_path):
    config = script.Config.load(write(tmp_path, "[archive]\n"))
    assert config.int("archive", "prefetch", 8) == 8
    assert config.str("archive", "spool_dir", "/var/lib/pg_zfs/spool") == "/var/lib/pg_zfs/spool"


def test_malformed_file_is_one_line(script, tmp_path):
    with pytest.raises(script.Failure) as caught:
        script.Config.load(write(tmp_path, "no section header\n"))
    assert "\n" not in str(caught.value) and caught.value.code == 2


def test_config_path_prefers_option_then_environment_then_default(script, monkeypatch):
    monkeypatch.setenv("PG_ZFS_CONFIG", "/env.conf")
    assert script.config_path("/opt.conf") == "/opt.conf"
    assert script.config_path(None) == "/env.conf"
    monkeypatch.delenv("PG_ZFS_CONFIG")
    assert script.config_path(None) == "/etc/pg_zfs/pg_zfs.conf"


C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
            "PYTHONIOENCODING": ""}
LOAD = ("import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('s', sys.argv[1])\n"
        "script = importlib.util.module_from_spec(spec); spec.loader.exec_module(script)\n"
        "try:\n"
        "    config = script.Config.load(sys.argv[2])\n"
        "    print(config.str('source host25', 'host'))\n"
        "except script.Failure as failure:\n"
        "    print(failure); sys.exit(failure.code)\n")


def load_in_c_locale(script_name, path):
    """Config.load of bin/SCRIPT.py in a process under the C locale, as cron and a
    postmaster started without LANG run it (Python 3.6 when pyenv has it: no locale coercion)."""
    import subprocess
    import sys
    from testbed import PY36
    python = PY36 if os.path.exists(PY36) else sys.executable
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("LC_") and k != "LANG")
    env.update(C_LOCALE)
    return subprocess.run([python, "-c", LOAD, os.path.join(BIN, script_name + ".py"), path],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_a_utf8_comment_is_read_under_the_c_locale(script_name, tmp_path):
    path = tmp_path / "pg_zfs.conf"
    path.write_bytes(u"# Gérard's archive host, maintained by Jürgen\n"
                     u"[source host25]\nhost = 172.16.18.25\n".encode("utf-8"))
    done = load_in_c_locale(script_name, str(path))
    assert (done.returncode, done.stdout.strip()) == (0, "172.16.18.25"), done.stderr


@pytest.mark.parametrize("script_name", SCRIPTS)
def test_a_byte_that_is_not_utf8_is_one_line_naming_file_and_line(script_name, tmp_path):
    path = tmp_path / "pg_zfs.conf"
    path.write_bytes(b"[source host25]\n# G\xe9rard (latin-1)\nhost = 172.16.18.25\n")
    done = load_in_c_locale(script_name, str(path))
    assert done.returncode == 2
    assert done.stdout.strip() == ("%s: line 2 is not UTF-8 text (byte 0xE9); save the file as UTF-8"
                                   % path)


MAIN_ARGS = {"pg_wal_fetch": ["000000010000000000000001", "pg_wal/RECOVERYXLOG"], "pg_zfs_snap": ["list"],
             "pg_zfs_restore": ["list"], "setup_guest": ["--role", "guest", "--start"]}


@pytest.mark.parametrize("script_name", SCRIPTS)
@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/etc/pg_zfs/x"),
                                   ZeroDivisionError("division by zero")])
def test_an_unexpected_error_is_one_line_and_an_exit_code_never_a_traceback(script_name, error, monkeypatch,
                                                                           capsys, tmp_path):
    # No real component raises a bug on demand: the config loader stands in for "anything".
    script = load_script(script_name)

    def broken(*args, **kwargs):
        raise error
    monkeypatch.setattr(script.Config, "load", broken)
    monkeypatch.chdir(tmp_path)
    code = script.main(["-c", "/nonexistent.conf"] + MAIN_ARGS[script_name])
    err = capsys.readouterr().err
    assert code in (1, 3), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "ERROR" in line]
    assert len(lines) == 1, err
    assert ("Permission denied: /etc/pg_zfs/x" if isinstance(error, PermissionError)
            else "internal error: ZeroDivisionError: division by zero") in lines[0]


@pytest.mark.parametrize("script_name,args,said", [
    ("pg_zfs_restore", ["cleanup", "--all"], "pg_zfs_restore: ERROR: stopped by SIGTERM"),
    ("pg_zfs_snap", ["list"], "pg_zfs_snap: ERROR: stopped by signal 15")])
def test_a_signal_that_lands_while_a_line_is_logged_ends_the_command(script_name, args, said, monkeypatch,
                                                                     capsys):
    """CI, stop 26: a SIGTERM that came while the restore wrote a log line was taken by
    logging's `except Exception` for a failed line ("--- Logging error ---") and the
    restore went on. A real signal, sent from inside a real handler's format()."""
    script = load_script(script_name)

    class Signalled(object):
        def __str__(self):
            os.kill(os.getpid(), signal.SIGTERM)    # the handler runs as kill returns: inside emit()
            return "a line"

    def load(*_args, **_kwargs):
        script.log.warning("%s", Signalled())
        raise AssertionError("the signal was swallowed")
    monkeypatch.setattr(script.Config, "load", load)
    code = script.main(["-c", "/nonexistent.conf"] + args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Logging error" not in err and "swallowed" not in err, err
    assert err.strip().splitlines()[-1] == said, err
