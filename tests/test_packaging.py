"""Install like a package: `make install`, the RPM and the .deb, built here from
this tree (in a temporary directory, removed afterwards), and man pages made
from the scripts themselves, so that they cannot say what the scripts do not.

Nothing is installed on this machine: the packages are read with rpm -qp,
rpm2archive, dpkg-deb -c/-I/-x."""

import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time

import pytest

from testbed import PY36, PY313, REPO, load_script

SCRIPTS = ("pg_wal_fetch.py", "pg_zfs_restore.py", "pg_zfs_snap.py", "setup_guest.py")
PAGES = tuple("man1/%s.1" % script for script in SCRIPTS) + ("man5/pg_zfs.conf.5",)
UNITS = ("pg-zfs-guest.service", "pg-zfs-snap.service", "pg-zfs-snap.timer")
EXAMPLES = ("crontab.example", "pg_zfs.conf.example", "rc.local.guest", "rc.local.host")
CONFIG = "etc/pg_zfs/pg_zfs.conf"
SPEC = os.path.join(REPO, "packaging", "pg_zfs.spec")
VERSION = load_script("pg_zfs_snap").VERSION
BUILD_TIMES = {}


def load_tool(name):
    path = os.path.join(REPO, "tools", name + ".py")
    spec = importlib.util.spec_from_file_location("pg_zfs_tool_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv, env=None, cwd=None, timeout=300):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=dict(os.environ, **(env or {})), cwd=cwd, timeout=timeout)


def make(*args):
    # Under `make test`, the outer make's command-line variables would reach this one.
    env = dict((name, value) for name, value in os.environ.items() if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"))
    proc = subprocess.run(["make", "--no-print-directory", "-C", REPO] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def expected_files(docdir):
    """Every file a PREFIX=/usr install holds, relative to the root."""
    return set([CONFIG] + ["usr/bin/" + script for script in SCRIPTS]
               + ["usr/share/man/" + page for page in PAGES]
               + ["usr/lib/systemd/system/" + unit for unit in UNITS]
               + ["%s/examples/%s" % (docdir, example) for example in EXAMPLES]
               + ["%s/README.md" % docdir, "%s/DEVELOPERS.md" % docdir])


def tree_files(root):
    """{relative path: mode} of every file and directory below root."""
    found = {}
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(top, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_mode
    return found


def pythons():
    """Python 3.6 and 3.13 where pyenv has them; else the system python3."""
    return [PY36, PY313 or "/usr/bin/python3"]


def rendered(page, width="80", charset="C"):
    """The page as man shows it (hyphenation is off in our pages: words stay whole)."""
    proc = run(["man", "-l", page], env={"MANWIDTH": width, "LC_ALL": charset, "MAN_KEEP_FORMATTING": ""})
    assert proc.returncode == 0, proc.stderr
    return re.sub(r".\x08", "", proc.stdout)


def first_missing(words, text_words):
    """The first of words not found, in order, in text_words; None if all are."""
    position = 0
    for word in words:
        try:
            position = text_words.index(word, position) + 1
        except ValueError:
            return (word, " ".join(text_words[max(0, position - 8):position + 8]))
    return None


def words_of(text):
    return [word.rstrip(":") for word in text.split() if word.rstrip(":")]


def assert_runs_help_and_version(bin_dir, python):
    for script in SCRIPTS:
        path = os.path.join(bin_dir, script)
        helped = run([python, path, "--help"], timeout=60)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (python, script, helped.stderr)
        versioned = run([python, path, "--version"], timeout=60)
        assert versioned.returncode == 0, (python, script, versioned.stderr)
        assert VERSION in versioned.stdout + versioned.stderr, (python, script, versioned.stdout)


def assert_renders_without_warnings(page):
    proc = run(["man", "-l", "--warnings", page], env={"MANWIDTH": "80"})
    assert proc.returncode == 0 and proc.stderr == "", (page, proc.stderr)
    if not page.endswith(".gz"):
        proc = run(["groff", "-ww", "-man", "-z", page])
        assert proc.returncode == 0 and proc.stderr == "", (page, proc.stderr)


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="pg_zfs-packaging-")
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def installed(workdir):
    """`make install PREFIX=/usr DESTDIR=...`, the man pages made under Python 3.6."""
    root = os.path.join(workdir, "install")
    make("install", "PREFIX=/usr", "DESTDIR=" + root, "BUILD=" + os.path.join(workdir, "build-install"),
         "PYTHON=" + PY36)
    return root


@pytest.fixture(scope="module")
def rpm_file(workdir):
    build = os.path.join(workdir, "build-rpm")
    started = time.time()
    make("rpm", "BUILD=" + build)
    BUILD_TIMES["rpm"] = time.time() - started
    path = os.path.join(build, "rpm", "RPMS", "noarch", "pg_zfs-%s-1.noarch.rpm" % VERSION)
    assert os.path.isfile(path), os.listdir(build)
    return path


@pytest.fixture(scope="module")
def deb_file(workdir):
    build = os.path.join(workdir, "build-deb")
    started = time.time()
    make("deb", "BUILD=" + build, "PYTHON=" + PY36)
    BUILD_TIMES["deb"] = time.time() - started
    path = os.path.join(build, "pg-zfs_%s-1_all.deb" % VERSION)
    assert os.path.isfile(path), os.listdir(build)
    return path


# ---------------------------------------------------------------------------
# make install
# ---------------------------------------------------------------------------

def test_make_install_puts_each_file_where_a_distribution_expects_it(installed):
    files = set(path for path, mode in tree_files(installed).items() if not os.path.isdir(
        os.path.join(installed, path)))
    assert files == expected_files("usr/share/doc/pg_zfs")


def test_make_install_gives_scripts_0755_everything_else_0644_and_nothing_world_writable(installed):
    for path, mode in tree_files(installed).items():
        if os.path.isdir(os.path.join(installed, path)):
            assert mode & 0o7777 == 0o755, path
        else:
            assert mode & 0o7777 == (0o755 if path.startswith("usr/bin/") else 0o644), (path, oct(mode))


def test_installed_units_examples_and_pages_name_the_installed_scripts(installed):
    snap_unit = open(os.path.join(installed, "usr/lib/systemd/system/pg-zfs-snap.service")).read()
    assert "ExecStart=/usr/bin/pg_zfs_snap.py -c /etc/pg_zfs/pg_zfs.conf\n" in snap_unit
    crontab = open(os.path.join(installed, "usr/share/doc/pg_zfs/examples/crontab.example")).read()
    assert "root /usr/bin/pg_zfs_snap.py -c /etc/pg_zfs/pg_zfs.conf\n" in crontab
    for path in expected_files("usr/share/doc/pg_zfs"):
        if not path.startswith(("usr/bin/", "usr/share/doc/pg_zfs/README", "usr/share/doc/pg_zfs/DEVELOPERS")):
            assert "/opt/pg_zfs" not in open(os.path.join(installed, path)).read().replace("\\-", "-"), path
    assert "restore_command = \\(aq/usr/bin/pg_wal_fetch.py %f %p\\(aq" in open(
        os.path.join(installed, "usr/share/man/man1/pg_wal_fetch.py.1")).read()
    assert open(os.path.join(installed, CONFIG)).read() == open(os.path.join(REPO, "etc/pg_zfs.conf.example")).read()
    for script in SCRIPTS:
        assert open(os.path.join(installed, "usr/bin", script)).read() == open(os.path.join(REPO, "bin", script)).read()


def test_make_install_keeps_a_config_that_is_there_and_can_name_the_python(workdir):
    root = os.path.join(workdir, "again")
    os.makedirs(os.path.join(root, "etc", "pg_zfs"))
    with open(os.path.join(root, CONFIG), "w") as edited:
        edited.write("[postgres]\npgdata = /srv/pgdata\n")
    proc = make("install", "PREFIX=/usr", "DESTDIR=" + root, "BUILD=" + os.path.join(workdir, "build-again"),
                "SHEBANG=/usr/bin/python3")
    assert open(os.path.join(root, CONFIG)).read() == "[postgres]\npgdata = /srv/pgdata\n"
    assert "install: kept %s/%s" % (root, CONFIG) in proc.stdout
    for script in SCRIPTS:
        assert open(os.path.join(root, "usr/bin", script)).readline() == "#!/usr/bin/python3\n"


def test_installed_scripts_answer_help_and_version_under_python_3_6_and_3_13(installed):
    for python in pythons():
        assert_runs_help_and_version(os.path.join(installed, "usr", "bin"), python)


# ---------------------------------------------------------------------------
# Man pages
# ---------------------------------------------------------------------------

def test_every_page_renders_without_a_warning(installed):
    for page in PAGES:
        assert_renders_without_warnings(os.path.join(installed, "usr/share/man", page))


def test_man_finds_each_page_by_the_name_the_command_is_typed_as(installed):
    manpath = os.path.join(installed, "usr/share/man")
    for name, page in [(script, "man1/%s.1" % script) for script in SCRIPTS] + [("pg_zfs.conf", PAGES[-1])]:
        proc = run(["man", "-M", manpath, "-w", name])
        assert proc.stdout.strip() == os.path.join(manpath, page), (name, proc.stderr)


def test_a_rebuild_of_the_pages_gives_the_installed_bytes_and_no_warning(installed, workdir):
    out = os.path.join(workdir, "man-again")
    proc = run([PY36, os.path.join(REPO, "tools", "mkman.py"), "--bindir", "/usr/bin",
                "--docdir", "/usr/share/doc/pg_zfs", out])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for page in PAGES:
        fresh = open(os.path.join(out, os.path.basename(page))).read()
        assert fresh == open(os.path.join(installed, "usr/share/man", page)).read(), page


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_command_page_holds_every_word_of_the_docstring_and_every_option_in_order(script, installed):
    mkman = load_tool("mkman")
    module = load_script(script[:-3])
    text = rendered(os.path.join(installed, "usr/share/man/man1", script + ".1"), width="100")
    page_words = words_of(text)
    doc = module.__doc__.replace(mkman.WIRING_BINDIR, "/usr/bin")
    summary, _, rest = doc.strip("\n").partition("\n\n")
    assert first_missing(words_of(summary.rstrip().rstrip("."))[1:], page_words) is None
    description = page_words[page_words.index("DESCRIPTION"):page_words.index("OPTIONS")]
    assert first_missing(words_of(rest), description) is None
    parser = mkman.script_parser(module)
    options = page_words[page_words.index("OPTIONS"):]
    for sub_name, _, sub in [(None, None, parser)] + mkman.subcommands(parser):
        if sub_name:
            assert "%s %s" % (script, sub_name) in text
        for action in sub._actions:
            if action.help == "==SUPPRESS==" or not action.option_strings:
                continue
            wanted = words_of(", ".join(action.option_strings)) + words_of(mkman.expanded_help(action, sub.prog))
            assert first_missing(wanted, options) is None, (script, sub_name, action.option_strings)


def config_page_sections(installed):
    """{section title: its text} of pg_zfs.conf(5) as man shows it."""
    text = rendered(os.path.join(installed, "usr/share/man/man5/pg_zfs.conf.5"), width="200")
    parts = re.split(r"^\[(.+)\]$", text.split("\nFILES\n")[0], flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_config_page_has_every_schema_key_with_its_kind_and_the_scripts_that_read_it(installed):
    schema = load_script("pg_wal_fetch").CONFIG_SCHEMA
    sections = config_page_sections(installed)
    # Who reads what, found the way tests/test_config.py finds it: the calls in each script.
    readers = {}
    for script in SCRIPTS:
        source = open(os.path.join(REPO, "bin", script)).read()
        for section, key in re.findall(r'\.(?:str|int|choice|list|duration)\(\s*"(\w+)",\s*"(\w+)"', source):
            readers.setdefault((section, key), set()).add(script)
        for key in re.findall(r'config\.\w+\(section,\s*"(\w+)"', source):
            readers.setdefault(("source", key), set()).add(script)
        for key in re.findall(r'config\.\w+\(replica_section,\s*"(\w+)"', source):
            readers.setdefault(("replica", key), set()).add(script)
    for section, keys in schema.items():
        text = sections[section + " NAME" if section in ("source", "replica") else section]
        entries = re.split(r"^ {7}(?=\w+ = )", text, flags=re.M)[1:]
        by_key = dict((entry.split(" = ", 1)[0], " ".join(entry.split())) for entry in entries)
        assert set(by_key) == set(keys), section
        for key, kind in keys.items():
            words = load_tool("mkman").kind_words(kind)
            assert by_key[key].startswith("%s = %s " % (key, words)), by_key[key]
            read_by = re.search(r"Read by: (.*)\.$", by_key[key])
            assert read_by, by_key[key]
            read_by = read_by.group(1)
            for script in readers.get((section, key), ()):
                assert script in read_by, (section, key, read_by)


def test_the_config_page_gives_defaults_as_the_scripts_apply_them(installed):
    sections = config_page_sections(installed)
    assert "Default: 5432. Example: 1921." in " ".join(sections["postgres"].split())
    assert "Default: 26h." in " ".join(sections["snapshot"].split())
    assert "Default: /var/lib/pg_zfs/restore." in " ".join(sections["restore"].split())
    assert "Default: none (required)" in " ".join(sections["host"].split())


# ---------------------------------------------------------------------------
# The RPM
# ---------------------------------------------------------------------------

def rpm_query(rpm_file, *args):
    proc = run(["rpm", "-qp"] + list(args) + [rpm_file])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_rpm_is_noarch_of_this_version_and_needs_only_python3(rpm_file):
    assert rpm_query(rpm_file, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}") == "pg_zfs %s 1 noarch" % VERSION
    requires = set(rpm_query(rpm_file, "-R").split("\n")) - {""}
    assert "python3" in requires
    assert set(line for line in requires if not line.startswith("rpmlib(")) == {
        "python3", "/usr/bin/python3", "config(pg_zfs) = %s-1" % VERSION}


def test_the_rpm_holds_what_make_install_installs_with_its_modes_and_the_config_noreplace(rpm_file):
    listing = rpm_query(rpm_file, "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} "
                                          "%{FILEFLAGS:fflags}| %{FILENAMES}\n]")
    files = {}
    for line in listing.splitlines():
        head, _, path = line.partition("| ")
        perms, owner, flags = (head.split() + [""])[:3]
        assert owner == "root:root" and perms[8] != "w", line
        if perms.startswith("d"):
            assert perms == "drwxr-xr-x", line
            continue
        files[re.sub(r"(\.[15])\.gz$", r"\1", path.lstrip("/"))] = (perms, flags)
    assert set(files) == expected_files("usr/share/doc/pg_zfs")
    for path, (perms, flags) in files.items():
        assert perms == ("-rwxr-xr-x" if path.startswith("usr/bin/") else "-rw-r--r--"), path
        assert ("d" in flags) == path.startswith(("usr/share/doc/", "usr/share/man/")), (path, flags)
    assert files[CONFIG][1] == "cn"            # %config(noreplace)
    assert rpm_query(rpm_file, "--configfiles").split() == ["/" + CONFIG]


def test_the_rpm_payload_scripts_run_under_python_3_6(rpm_file, workdir):
    payload = os.path.join(workdir, "rpm-payload")
    with open(rpm_file, "rb") as package:
        archive = subprocess.run(["rpm2archive", "-"], stdin=package, stdout=subprocess.PIPE, check=True).stdout
    with open(payload + ".tar", "wb") as out:
        out.write(archive)
    with tarfile.open(payload + ".tar") as tar:
        tar.extractall(payload)
    assert open(os.path.join(payload, "usr/bin/pg_wal_fetch.py")).readline() == "#!/usr/bin/python3\n"
    assert_runs_help_and_version(os.path.join(payload, "usr", "bin"), PY36)


# ---------------------------------------------------------------------------
# The .deb
# ---------------------------------------------------------------------------

def dpkg_deb(*args):
    proc = run(["dpkg-deb"] + list(args))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_deb_is_all_of_this_version_needs_only_python3_and_keeps_the_config(deb_file):
    fields = dpkg_deb("-f", deb_file, "Package", "Version", "Architecture", "Depends")
    assert fields.splitlines() == ["Package: pg-zfs", "Version: %s-1" % VERSION, "Architecture: all",
                                   "Depends: python3"]
    assert dpkg_deb("-I", deb_file, "conffiles").split() == ["/" + CONFIG]
    assert "daemon-reload" in dpkg_deb("-I", deb_file, "postinst")


def test_the_deb_holds_what_make_install_installs_root_owned_with_its_modes(deb_file):
    files = {}
    for line in dpkg_deb("-c", deb_file).splitlines():
        perms, owner, _, _, _, path = line.split(None, 5)
        assert owner == "root/root" and perms[8] != "w", line
        if perms.startswith("d"):
            assert perms == "drwxr-xr-x", line
        else:
            files[path[2:]] = perms
    docdir = "usr/share/doc/pg-zfs"
    assert set(files) == set(re.sub(r"(man/man\d/.*)$", r"\1.gz", path)
                             for path in expected_files(docdir)) | {docdir + "/changelog.Debian.gz",
                                                                    docdir + "/copyright"}
    for path, perms in files.items():
        assert perms == ("-rwxr-xr-x" if path.startswith("usr/bin/") else "-rw-r--r--"), path


def test_the_deb_payload_scripts_run_under_python_3_6_and_its_pages_render(deb_file, workdir):
    payload = os.path.join(workdir, "deb-payload")
    dpkg_deb("-x", deb_file, payload)
    assert_runs_help_and_version(os.path.join(payload, "usr", "bin"), PY36)
    for page in PAGES:
        assert_renders_without_warnings(os.path.join(payload, "usr/share/man", page + ".gz"))
    assert "/usr/share/doc/pg-zfs/README.md" in rendered(os.path.join(payload, "usr/share/man", PAGES[0] + ".gz"))


# ---------------------------------------------------------------------------
# One version
# ---------------------------------------------------------------------------

def test_the_spec_and_both_changelogs_carry_the_version_of_the_scripts():
    assert set(load_script(script[:-3]).VERSION for script in SCRIPTS) == {VERSION}
    mkdeb = load_tool("mkdeb")
    spec = mkdeb.read_spec(SPEC)
    assert spec["version"] == VERSION
    assert spec["changelog"].splitlines()[0].endswith(" - %s-%s" % (VERSION, spec["release"]))
    assert mkdeb.debian_changelog(spec["changelog"]).startswith("pg-zfs (%s-1) unstable" % VERSION)


def test_a_deb_of_another_version_than_the_spec_is_refused(workdir):
    proc = run([PY36, os.path.join(REPO, "tools", "mkdeb.py"), "--version", "9.9.9",
                os.path.join(workdir, "no-tree"), workdir])
    assert proc.returncode == 1
    assert proc.stderr == "mkdeb: %s: Version %s, but the scripts say 9.9.9\n" % (SPEC, VERSION)


def test_package_build_times_are_reported(rpm_file, deb_file):
    print("\npackage builds: rpm %.1fs, deb %.1fs" % (BUILD_TIMES["rpm"], BUILD_TIMES["deb"]))
    assert BUILD_TIMES["rpm"] < 120 and BUILD_TIMES["deb"] < 120
