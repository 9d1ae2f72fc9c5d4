"""setup_guest.py --install and the replicas' key (issue 16), run as a process the
way a DBA runs it, on --root trees: no pool and no sshd here.

On the guest, --install creates root's key (replicate runs from root's cron) and
prints, per [replica NAME], the line pg_zfs_snap.py authorized-keys writes; on
the replica, --role replica --install --authorized-key LINE installs
pg_zfs_receive and LINE, and refuses any line that would not restrict the key.
tests/test_replicate.py installs the line this way into a real sshd and
replicates through it (it uses the pool, so it runs in the test guest too).
"""

import os
import pwd
import shutil
import subprocess

import pytest

from testbed import BIN, PY36, load_script

SNAP = load_script("pg_zfs_snap")
SETUP = load_script("setup_guest")
ROOT_HOME = pwd.getpwuid(0).pw_dir
PG_USER = "postgres"
GUEST_ADDRESS = "127.0.0.9"          # the replica's from=: BindAddress of ssh_options
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOth admin@desk"


def setup_guest(*args, script=os.path.join(BIN, "setup_guest.py")):
    env = dict(os.environ)
    env.pop("PG_ZFS_CONFIG", None)
    return subprocess.run([PY36, script] + [str(arg) for arg in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=120)


def guest_config(tmp_path, **replica):
    """A guest's config with one [replica r1] (keys overridden by replica)."""
    keys = {"host": "127.0.0.1", "target": "bk/g1", "ssh_options": "-o BindAddress=" + GUEST_ADDRESS}
    keys.update(replica)
    path = tmp_path / "guest.conf"
    path.write_text("[postgres]\npgdata = /zp1/data02/pgdata\n[snapshot]\ndatasets = zp1/data01 zp1/data02\n"
                    "[guest]\nprimary_conninfo = host=primary\n[replica r1]\n"
                    + "".join("%s = %s\n" % item for item in sorted(keys.items())))
    return str(path)


def in_tree(tree, path):
    return os.path.join(str(tree), path.lstrip("/"))


def restricted_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("restrict,")]


def snapshot(tree):
    """{path: (bytes, mode, uid, mtime)} of every file and directory below tree."""
    found = {}
    for directory, dirs, files in os.walk(str(tree)):
        for name in dirs + files:
            path = os.path.join(directory, name)
            status = os.lstat(path)
            body = open(path, "rb").read() if name in files else None
            found[path] = (body, status.st_mode, status.st_uid, status.st_mtime_ns)
    return found


# -- the guest: root's key and the line for each replica -----------------------------

def test_guest_install_creates_roots_key_and_prints_the_line_restricting_it_to_the_receiver(tmp_path):
    tree = tmp_path / "tree"
    config = guest_config(tmp_path)
    proc = setup_guest("-c", config, "--role", "guest", "--install", "--using", "cron", "--root", tree)
    assert proc.returncode == 0, proc.stderr
    key = in_tree(tree, os.path.join(ROOT_HOME, ".ssh", "id_ed25519"))
    status = os.stat(key)
    assert (status.st_mode & 0o777, status.st_uid) == (0o600, 0)
    assert os.stat(os.path.dirname(key)).st_mode & 0o777 == 0o700
    with open(key + ".pub") as public:
        public_key = public.read()
    assert " root@" in public_key
    # The next step on the replica, then pg_zfs_snap.py authorized-keys' own lines.
    assert ("# on replica r1 (127.0.0.1), as root: setup_guest.py --role replica --install --authorized-key "
            "'LINE', LINE being the last line below") in proc.stdout
    assert "# [replica r1] root@127.0.0.1:bk/g1: " in proc.stdout
    assert restricted_lines(proc.stdout) == [SNAP.receiver_keys_line(public_key, GUEST_ADDRESS, "bk/g1")]
    assert proc.stdout.rstrip("\n").endswith(restricted_lines(proc.stdout)[0])
    # Again: the key stays, the same line is printed, nothing changes.
    before = snapshot(tree)
    again = setup_guest("-c", config, "--role", "guest", "--install", "--using", "cron", "--root", tree)
    assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr
    assert restricted_lines(again.stdout) == restricted_lines(proc.stdout)
    assert snapshot(tree) == before


def test_guest_install_print_without_a_key_says_what_it_would_print_and_writes_nothing(tmp_path):
    tree = tmp_path / "tree"
    proc = setup_guest("-c", guest_config(tmp_path), "--role", "guest", "--install", "--print", "--using", "cron",
                       "--root", tree)
    assert proc.returncode == 0, proc.stderr
    key = in_tree(tree, os.path.join(ROOT_HOME, ".ssh", "id_ed25519"))
    assert "would: create ssh key %s for root" % key in proc.stdout
    assert "(the lines of pg_zfs_snap.py authorized-keys --replica r1 for the public key of %s, once created)" \
        % key in proc.stdout
    assert restricted_lines(proc.stdout) == []
    assert not tree.exists()


def test_a_replicas_identity_file_and_user_are_the_ones_installed_and_named(tmp_path):
    tree = tmp_path / "tree"
    config = guest_config(tmp_path, identity_file="/etc/pg_zfs/replica_key", user="pgzfs")
    proc = setup_guest("-c", config, "--role", "guest", "--install", "--using", "cron", "--root", tree)
    assert proc.returncode == 0, proc.stderr
    key = in_tree(tree, "/etc/pg_zfs/replica_key")
    assert os.stat(key).st_mode & 0o777 == 0o600 and os.stat(key).st_uid == 0
    assert not os.path.exists(in_tree(tree, os.path.join(ROOT_HOME, ".ssh", "id_ed25519")))
    with open(key + ".pub") as public:
        line = SNAP.receiver_keys_line(public.read(), GUEST_ADDRESS, "bk/g1")
    assert "setup_guest.py --role replica --install --user pgzfs --authorized-key 'LINE'" in proc.stdout
    assert "then this line in ~pgzfs/.ssh/authorized_keys (key %s.pub;" % key in proc.stdout
    assert restricted_lines(proc.stdout) == [line]
    # --print, the key there: the same line, read only.
    printed = setup_guest("-c", config, "--role", "guest", "--install", "--print", "--using", "cron",
                          "--root", tree)
    assert printed.returncode == 0 and restricted_lines(printed.stdout) == [line], printed.stderr


def test_guest_install_without_pg_zfs_snap_beside_it_or_without_the_public_key_fails_in_one_line(tmp_path):
    tree = tmp_path / "tree"
    lonely = tmp_path / "bin" / "setup_guest.py"
    lonely.parent.mkdir()
    shutil.copy(os.path.join(BIN, "setup_guest.py"), str(lonely))
    config = guest_config(tmp_path)
    proc = setup_guest("-c", config, "--role", "guest", "--install", "--using", "cron", "--root", tree,
                       script=str(lonely))
    errors = [line for line in proc.stderr.splitlines() if ": ERROR: " in line]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "pg_zfs_snap.py not found in %s: it prints the replicas' authorized_keys lines" % lonely.parent \
        in errors[0]
    assert restricted_lines(proc.stdout) == []
    key = in_tree(tree, os.path.join(ROOT_HOME, ".ssh", "id_ed25519"))
    os.unlink(key + ".pub")
    proc = setup_guest("-c", config, "--role", "guest", "--install", "--using", "cron", "--root", tree)
    errors = [line for line in proc.stderr.splitlines() if ": ERROR: " in line]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert errors[0].endswith("no public key %s.pub next to %s" % (key, key))


# -- the replica: pg_zfs_receive and the line, nothing else ---------------------------

GUEST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGuestGuestGuestGuestGuestGuestGuestGues root@guest pg_zfs"


def guest_key_line(parent="bk/g1", receiver=SNAP.RECEIVER_PATH):
    return SNAP.receiver_keys_line(GUEST_KEY, GUEST_ADDRESS, parent, receiver)


def replica_tree(tmp_path):
    """A replica's --root tree where the guest's key was copied bare into root's
    authorized_keys, beside someone else's key."""
    tree = tmp_path / "replica"
    keys = tmp_path / "replica" / ROOT_HOME.lstrip("/") / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text("%s\n%s\n" % (OTHER_KEY, GUEST_KEY))
    keys.chmod(0o600)
    return tree, keys


def test_replica_install_writes_the_receiver_and_the_line_once(tmp_path):
    tree, root_keys = replica_tree(tmp_path)
    line = guest_key_line()
    printed = setup_guest("--role", "replica", "--install", "--print", "--authorized-key", line, "--root", tree)
    assert printed.returncode == 0, printed.stderr
    assert "would: write %s" % in_tree(tree, SNAP.RECEIVER_PATH) in printed.stdout
    assert not os.path.exists(in_tree(tree, SNAP.RECEIVER_PATH))
    proc = setup_guest("--role", "replica", "--install", "--authorized-key", line, "--root", tree,
                       "-c", tmp_path / "absent.conf")          # a replica needs no config
    assert proc.returncode == 0, proc.stderr
    receiver = in_tree(tree, SNAP.RECEIVER_PATH)
    with open(receiver) as written:
        assert written.read() == SNAP.receiver_script()
    assert (os.stat(receiver).st_mode & 0o7777, os.stat(receiver).st_uid) == (0o755, 0)
    assert root_keys.read_text() == "%s\n%s\n" % (OTHER_KEY, line)       # the bare copy replaced
    assert (root_keys.stat().st_mode & 0o777, root_keys.stat().st_uid) == (0o600, 0)
    # The parent is the DBA's to make: the next step, printed.
    assert proc.stdout.splitlines()[-1] == "zfs create -p bk/g1"
    assert "zfs allow" not in proc.stdout
    before = snapshot(tree)
    again = setup_guest("--role", "replica", "--install", "--authorized-key", line, "--root", tree)
    assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr
    assert snapshot(tree) == before


def test_replica_install_for_a_user_takes_the_key_out_of_roots_files_and_prints_zfs_allow(tmp_path):
    home = pwd.getpwnam(PG_USER)
    tree, root_keys = replica_tree(tmp_path)
    line = guest_key_line(receiver="/opt/pg_zfs/sbin/pg_zfs_receive")
    proc = setup_guest("--role", "replica", "--install", "--user", PG_USER, "--authorized-key", line,
                       "--root", tree)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(in_tree(tree, "/opt/pg_zfs/sbin/pg_zfs_receive"))       # where command= runs it
    keys = in_tree(tree, os.path.join(home.pw_dir, ".ssh", "authorized_keys"))
    with open(keys) as written:
        assert written.read() == line + "\n"
    assert (os.stat(keys).st_mode & 0o777, os.stat(keys).st_uid) == (0o600, home.pw_uid)
    assert (os.stat(os.path.dirname(keys)).st_mode & 0o777, os.stat(os.path.dirname(keys)).st_uid) == \
        (0o700, home.pw_uid)
    assert root_keys.read_text() == OTHER_KEY + "\n"              # no way in as root any more
    assert proc.stdout.splitlines()[-2:] == [
        "zfs create -p bk/g1", "zfs allow -u %s create,mount,receive,destroy,userprop bk/g1" % PG_USER]


def test_a_btrfs_replicas_line_installs_for_root_only_and_names_a_directory_to_make(tmp_path):
    tree, root_keys = replica_tree(tmp_path)
    line = guest_key_line(parent="/srv/replica/g1")
    proc = setup_guest("--role", "replica", "--install", "--authorized-key", line, "--root", tree)
    assert proc.returncode == 0, proc.stderr
    with open(in_tree(tree, SNAP.RECEIVER_PATH)) as written:
        assert written.read() == SNAP.receiver_script()
    assert root_keys.read_text() == "%s\n%s\n" % (OTHER_KEY, line)
    assert proc.stdout.splitlines()[-1].startswith("mkdir -p /srv/replica/g1 ")
    assert "zfs" not in proc.stdout.splitlines()[-1]
    other = tmp_path / "other"
    refused = setup_guest("--role", "replica", "--install", "--user", PG_USER, "--authorized-key", line,
                          "--root", other)
    assert refused.returncode == 2 and "btrfs receive needs it" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not other.exists()


@pytest.mark.parametrize("line", [
    GUEST_KEY,
    guest_key_line().replace("restrict,", ""),
    guest_key_line().replace('from="%s",' % GUEST_ADDRESS, ""),
    guest_key_line().replace(SNAP.RECEIVER_PATH + " bk/g1", "/bin/sh -c id"),
    guest_key_line().replace(SNAP.RECEIVER_PATH + " bk/g1", SETUP.SERVER_PATH + " '/arch/*'"),
    guest_key_line().replace("bk/g1", "bk/g1;id"),
    guest_key_line().replace(SNAP.RECEIVER_PATH, "pg_zfs_receive"),
], ids=["bare", "no restrict", "no from", "a shell", "pg_wal_serve", "a second command", "a relative path"])
def test_replica_install_refuses_a_line_that_does_not_restrict_the_key_and_writes_nothing(tmp_path, line):
    tree = tmp_path / "replica"
    proc = setup_guest("--role", "replica", "--install", "--authorized-key", line, "--root", tree)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "not a line that restricts a key to pg_zfs_receive below one parent" in proc.stderr
    assert ("(this one is an archive host's: --role host)" in proc.stderr) == (SETUP.SERVER_PATH in line)
    assert not tree.exists()


def test_an_archive_host_refuses_the_replicas_line_and_names_the_role_it_is_for(tmp_path):
    config = tmp_path / "host.conf"
    config.write_text("[host]\ndomain = guest\n")
    proc = setup_guest("-c", config, "--role", "host", "--install", "--authorized-key", guest_key_line(),
                       "--root", tmp_path / "host")
    assert proc.returncode == 2 and "(this one is a replica's: --role replica)" in proc.stderr, proc.stderr
    assert not (tmp_path / "host").exists()


@pytest.mark.parametrize("args, says", [
    (["--check"], "--role replica takes --install --authorized-key LINE only"),
    (["--start"], "--role replica takes --install --authorized-key LINE only"),
    (["--install"], "--role replica takes --install --authorized-key LINE only"),
    (["--install", "--authorized-key", guest_key_line(), "--user", "nobody-here"], "--user 'nobody-here' does not exist"),
])
def test_role_replica_has_install_with_a_line_only(tmp_path, args, says):
    proc = setup_guest("--role", "replica", "--root", tmp_path / "replica", *args)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "replica").exists()


def test_user_is_for_the_replica_role_only(tmp_path):
    proc = setup_guest("-c", guest_config(tmp_path), "--role", "guest", "--install", "--user", "root",
                       "--root", tmp_path / "tree")
    assert proc.returncode == 2 and "--user is for --role replica" in proc.stderr
    assert not (tmp_path / "tree").exists()
