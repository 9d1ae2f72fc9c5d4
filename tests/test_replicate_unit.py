"""Replication's decisions without a replica: which snapshots go, incrementally from
what; how a replica's copies read back as sets (the restore's side too); what the
replica keeps; and pg_zfs_receive, the replica's forced command, run by sh on
command lines as sshd would hand them over, against a stand-in zfs that prints
its arguments."""

import collections
import json
import os
import shutil
import stat
import subprocess

import pytest

from testbed import load_script

STAMPS = ["20261101T040000Z", "20261102T040000Z", "20261103T040000Z"]


@pytest.fixture(scope="module")
def snap():
    return load_script("pg_zfs_snap")


@pytest.fixture(scope="module")
def restore():
    return load_script("pg_zfs_restore")


def props(name, datasets=("zp1/data01", "zp1/data02"), complete=True, **extra):
    found = {"set": name, "datasets": " ".join(datasets), "pgdata_dataset": "zp1/data02", "pgdata_rel": "pgdata",
             "mountpoints": "e30="}
    if complete:
        found["stop_lsn"] = "0/5000060"
    found.update(extra)
    return found


def local_rows(names, datasets=("zp1/data01", "zp1/data02")):
    return [(dataset, name, 0, props(name, datasets)) for name in names for dataset in datasets]


def copy_rows(names, parent="bk/g1", datasets=("zp1/data01", "zp1/data02"), complete=True):
    return [("%s/%s" % (parent, dataset.partition("/")[2]), name, 0,
             props(name, datasets, complete, copy_of=dataset)) for name in names for dataset in datasets]


# -- the copies on a replica read back as sets -----------------------------------------


@pytest.mark.parametrize("script_name", ["pg_zfs_snap", "pg_zfs_restore"])
def test_a_replica_reads_its_copies_as_the_sets_they_are_under_their_names_there(script_name):
    script = load_script(script_name)
    [one] = script.group_sets(copy_rows(["pgzfs_" + STAMPS[0]]), "pgzfs")
    assert one.complete
    assert one.datasets == ("bk/g1/data01", "bk/g1/data02")
    assert one.get("pgdata_dataset") == "bk/g1/data02"
    assert one.get("datasets") == "bk/g1/data01 bk/g1/data02"
    assert one.sources == {"bk/g1/data01": "zp1/data01", "bk/g1/data02": "zp1/data02"}
    assert script.sets_of([one], ["bk/g1/data02"]) == [one]
    assert script.sets_of([one], ["zp1/data02"]) == []


def test_the_sets_here_map_each_dataset_to_itself(snap):
    [one] = snap.group_sets(local_rows(["pgzfs_" + STAMPS[0]]), "pgzfs")
    assert one.sources == {"zp1/data01": "zp1/data01", "zp1/data02": "zp1/data02"}
    assert one.get("pgdata_dataset") == "zp1/data02"


def test_a_copy_missing_or_without_stop_lsn_leaves_its_set_incomplete(snap):
    name = "pgzfs_" + STAMPS[0]
    [one] = snap.group_sets(copy_rows([name])[1:], "pgzfs")
    assert not one.complete and one.present == ("bk/g1/data02",)
    rows = copy_rows([name])
    del rows[0][3]["stop_lsn"]
    assert not snap.group_sets(rows, "pgzfs")[0].complete


def test_copies_below_two_parents_are_two_sets_and_a_misplaced_copy_is_none(snap):
    name = "pgzfs_" + STAMPS[0]
    sets = snap.group_sets(copy_rows([name], "bk/g1") + copy_rows([name], "bk/old/g1"), "pgzfs")
    assert sorted(one.datasets for one in sets) == [("bk/g1/data01", "bk/g1/data02"),
                                                    ("bk/old/g1/data01", "bk/old/g1/data02")]
    assert all(one.complete for one in sets)
    renamed = [("bk/g1/elsewhere", name, 0, props(name, copy_of="zp1/data02"))]
    assert snap.group_sets(renamed, "pgzfs") == []
    outsider = [("bk/g1/data02", name, 0, props(name, copy_of="zp9/data02"))]
    assert snap.group_sets(outsider, "pgzfs") == []


def test_the_restore_finds_the_source_mountpoints_of_a_copy(restore):
    stored = b'{"zp1/data01": "/zp1/data01", "zp1/data02": "/zp1/data02"}'
    found = restore.source_mountpoints(["bk/g1/data01", "bk/g1/data02"], stored, {}, [],
                                       {"bk/g1/data01": "zp1/data01", "bk/g1/data02": "zp1/data02"})
    assert found == {"bk/g1/data01": ["/zp1/data01"], "bk/g1/data02": ["/zp1/data02"]}


# -- the layout -------------------------------------------------------------------------


def test_pool_path_lands_as_parent_path(snap):
    assert snap.replica_dataset("bk/g1", "zp1/data02") == "bk/g1/data02"
    assert snap.replica_dataset("bk/g1", "tank/pg/data") == "bk/g1/pg/data"
    assert snap.copy_parent("bk/g1/pg/data", "tank/pg/data") == "bk/g1"


@pytest.mark.parametrize("datasets, problem", [
    (["zp1"], "a pool's root dataset"),
    (["zp1/data", "zp2/data"], "would both be TARGET/data"),
    (["zp1/da ta"], "not a dataset name"),
    (["zp1/../x"], "not a dataset name"),
])
def test_datasets_that_cannot_share_one_parent_are_refused(snap, datasets, problem):
    assert problem in snap.replica_layout_problem(datasets)


def test_the_article_layout_can_be_replicated(snap):
    assert snap.replica_layout_problem(["zp1/data01", "zp1/data02", "zp1/data03", "zp1/data04"]) is None


# -- the listing ------------------------------------------------------------------------


def test_the_replica_listing_gives_rows_guids_and_file_systems_below_the_parent(snap):
    text = "\n".join([
        "bk/g1\tguid\t1", "bk/g1\tpgzfs:set\t-",
        "bk/g1/data02\tguid\t2",
        "bk/g1/data02@pgzfs_%s\tguid\t12345678901234567890" % STAMPS[0],
        "bk/g1/data02@pgzfs_%s\tpgzfs:set\tpgzfs_%s" % (STAMPS[0], STAMPS[0]),
        "bk/g1/data02@pgzfs_%s\tpgzfs:datasets\tzp1/data01 zp1/data02" % STAMPS[0],
        "bk/g1/data02@pgzfs_%s\tpgzfs:stop_lsn\t-" % STAMPS[0],
        "bk/g10/data02@x\tguid\t9",
    ])
    rows, guids, filesystems = snap.parse_replica_listing(text, "bk/g1")
    assert filesystems == ["bk/g1/data02"]
    assert guids == {"bk/g1/data02@pgzfs_" + STAMPS[0]: "12345678901234567890"}
    assert rows == [("bk/g1/data02", "pgzfs_" + STAMPS[0], 0,
                     {"set": "pgzfs_" + STAMPS[0], "datasets": "zp1/data01 zp1/data02"})]


# -- what a run sends -------------------------------------------------------------------


def sets_and_guids(snap, names):
    sets = snap.group_sets(local_rows(names), "pgzfs")
    guids = dict((one.snapshot(d), "%s-%s" % (one.name, d)) for one in sets for d in one.datasets)
    return sets, guids


def there(snap, names, guids, complete=True, parent="bk/g1"):
    rows = copy_rows(names, parent, complete=complete)
    copies = dict(("%s@%s" % (dataset, name), guids["zp1/%s@%s" % (dataset.rpartition("/")[2], name)])
                  for dataset, name, _, _ in rows)
    return snap.replica_sets(rows, "pgzfs", parent, ["zp1/data01", "zp1/data02"]), copies


def test_the_first_run_sends_the_oldest_set_whole_and_each_later_one_from_the_one_before(snap):
    names = ["pgzfs_" + stamp for stamp in STAMPS]
    sets, guids = sets_and_guids(snap, names)
    common, plan, problems = snap.plan_replication(sets, guids, [], {}, [], "bk/g1")
    assert (common, problems) == (None, [])
    assert [one.name for one, _ in plan] == names
    assert plan[0][1] == [snap.Send("zp1/data01@" + names[0], None, "bk/g1/data01"),
                          snap.Send("zp1/data02@" + names[0], None, "bk/g1/data02")]
    assert plan[2][1][1] == snap.Send("zp1/data02@" + names[2], "zp1/data02@" + names[1], "bk/g1/data02")


def test_a_later_run_sends_only_what_is_newer_than_the_newest_set_in_common(snap):
    names = ["pgzfs_" + stamp for stamp in STAMPS]
    sets, guids = sets_and_guids(snap, names)
    held, copies = there(snap, names[:2], guids)
    common, plan, problems = snap.plan_replication(sets, guids, held, copies, ["bk/g1/data01", "bk/g1/data02"],
                                                   "bk/g1")
    assert common.name == names[1] and problems == []
    assert [(one.name, [s.base for s in sends]) for one, sends in plan] == [
        (names[2], ["zp1/data01@" + names[1], "zp1/data02@" + names[1]])]


def test_a_set_cut_short_sends_only_the_snapshots_that_did_not_arrive_then_its_properties(snap):
    names = ["pgzfs_" + stamp for stamp in STAMPS[:2]]
    sets, guids = sets_and_guids(snap, names)
    held, copies = there(snap, names[:1], guids)
    copies["bk/g1/data01@" + names[1]] = guids["zp1/data01@" + names[1]]     # arrived, no properties yet
    common, plan, _ = snap.plan_replication(sets, guids, held, copies, ["bk/g1/data01", "bk/g1/data02"], "bk/g1")
    assert common.name == names[0]
    [(one, sends)] = plan
    assert sends == [snap.Send("zp1/data02@" + names[1], "zp1/data02@" + names[0], "bk/g1/data02")]
    copies["bk/g1/data02@" + names[1]] = guids["zp1/data02@" + names[1]]
    [(one, sends)] = snap.plan_replication(sets, guids, held, copies, ["bk/g1/data01"], "bk/g1")[1]
    assert one.name == names[1] and sends == []          # all there: properties only


def test_a_set_complete_there_with_a_copy_of_another_guid_is_not_common_and_is_a_problem(snap):
    names = ["pgzfs_" + stamp for stamp in STAMPS[:2]]
    sets, guids = sets_and_guids(snap, names)
    held, copies = there(snap, names, guids)
    copies["bk/g1/data02@" + names[1]] = "someone else's"
    common, plan, problems = snap.plan_replication(sets, guids, held, copies, ["bk/g1/data01", "bk/g1/data02"],
                                                   "bk/g1")
    assert common.name == names[0]
    assert problems == ["bk/g1/data02@%s exists there with another GUID than zp1/data02@%s: not a copy of it"
                        % (names[1], names[1])]


def test_a_dataset_there_that_holds_none_of_our_sets_is_never_overwritten(snap):
    sets, guids = sets_and_guids(snap, ["pgzfs_" + STAMPS[0]])
    _, _, problems = snap.plan_replication(sets, guids, [], {}, ["bk/g1/data02"], "bk/g1")
    assert problems == ["bk/g1/data02 exists there but holds no set of zp1/data02: nothing to send "
                        "zp1/data02@pgzfs_%s from" % STAMPS[0]]


def test_sets_older_than_the_newest_in_common_are_never_sent_again(snap):
    # The replica's retention pruned the middle set: it does not come back.
    names = ["pgzfs_" + stamp for stamp in STAMPS]
    sets, guids = sets_and_guids(snap, names)
    held, copies = there(snap, [names[0], names[2]], guids)
    common, plan, _ = snap.plan_replication(sets, guids, held, copies, ["bk/g1/data01", "bk/g1/data02"], "bk/g1")
    assert common.name == names[2] and plan == []


# -- what the replica keeps, what the guest keeps ---------------------------------------


def test_the_replica_prunes_by_its_policy_but_never_the_newest_set_in_common(snap):
    names = ["pgzfs_" + stamp for stamp in STAMPS]
    sets, guids = sets_and_guids(snap, names)
    held, _ = there(snap, names, guids)
    nothing_kept = snap.Policy(0, 0, 0, 0)
    now = snap.parse_utc("20261201T000000Z")
    assert snap.replica_prune_decision(held, nothing_kept, now, names[2]) == names[:2]
    # The set in common is kept even when it is not the newest there (prune_decision
    # keeps that one anyway).
    assert snap.replica_prune_decision(held, nothing_kept, now, names[1]) == names[:1]


def test_the_guest_keeps_the_newest_set_each_replica_holds(snap):
    names = ["pgzfs_" + stamp for stamp in STAMPS]
    rows = local_rows(names)
    for dataset, name, _, properties in rows:
        properties["replicated_to"] = {names[0]: "r1 r2", names[1]: "r1"}.get(name, "")
    sets = snap.group_sets(rows, "pgzfs")
    assert snap.replica_bases(sets, ["r1", "r2", "r3"]) == {names[1]: ["r1"], names[0]: ["r2"]}


# -- the command lines ------------------------------------------------------------------


def test_a_property_goes_in_single_quotes_and_a_character_the_receiver_refuses_is_refused(snap):
    assert snap.property_command("datasets", "zp1/data01 zp1/data02", ["bk/g1/data01@s", "bk/g1/data02@s"]) == \
        "zfs set 'pgzfs:datasets=zp1/data01 zp1/data02' bk/g1/data01@s bk/g1/data02@s"
    for value in ("it's", "a$(id)", "x\ny", ""):
        with pytest.raises(ValueError):
            snap.property_command("pgdata_rel", value, ["bk/g1/data02@s"])


@pytest.mark.parametrize("text, rate", [("", None), ("20M", 20 << 20), ("512K", 512 << 10), ("1000", 1000),
                                        ("1.5m", int(1.5 * (1 << 20)))])
def test_bwlimit_is_bytes_a_second(snap, text, rate):
    assert snap.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0", "-1M", "20 M"])
def test_a_bwlimit_that_is_not_a_rate_is_refused(snap, text):
    with pytest.raises(ValueError):
        snap.parse_rate(text)


def test_send_n_v_p_gives_the_size(snap):
    assert snap.send_size_of("incremental\tpgzfs_a\tzp1/data02@pgzfs_b\t1052304\nsize\t1052304\n") == 1052304
    assert snap.send_size_of("invalid option 'n'") is None


def test_the_authorized_keys_line_runs_the_receiver_below_the_parent_from_the_guest_only(snap):
    line = snap.receiver_keys_line("ssh-ed25519 AAAAC3Nz guest\n", "192.168.122.10", "bk/g1")
    assert line == ('restrict,from="192.168.122.10",command="/usr/local/bin/pg_zfs_receive bk/g1" '
                    'ssh-ed25519 AAAAC3Nz guest')
    with pytest.raises(snap.Failure):
        snap.receiver_keys_line("ssh-ed25519 AAAAC3Nz", "a b", "bk/g1")
    with pytest.raises(snap.Failure):
        snap.receiver_keys_line("ssh-ed25519 AAAAC3Nz", "10.0.0.1", "bk/g1; id")


def test_a_replica_with_resumable_receives_names_each_partial_one_and_its_token(snap):
    text = ("bk/g1\treceive_resume_token\t-\n"
            "bk/g1/data02\treceive_resume_token\t1-e604ea4bf-e0-789c63a2\n"
            "bk/g1/data01\treceive_resume_token\t-\n"
            "bk/g1/data01@s\treceive_resume_token\t-\n"
            "bk/g10/x\treceive_resume_token\t1-aa-bb\n")
    assert snap.parse_resume_tokens(text, "bk/g1") == {"bk/g1/data02": "1-e604ea4bf-e0-789c63a2"}


def test_a_send_resumes_a_token_or_goes_from_its_base(snap):
    assert snap.send_argv("zfs", "p/d@b", "p/d@a") == ["zfs", "send", "-i", "p/d@a", "p/d@b"]
    assert snap.send_argv("zfs", "p/d@a") == ["zfs", "send", "p/d@a"]
    assert snap.send_argv("zfs", None, token="1-ab-cd") == ["zfs", "send", "-t", "1-ab-cd"]


# -- pg_zfs_receive, by sh, with a zfs that prints its arguments ---------------------------

SET = "repl_20261125T040100Z"


@pytest.fixture(scope="module")
def receiver(snap, tmp_path_factory):
    """(run(command) -> CompletedProcess, log path): pg_zfs_receive for parent bk/g1 with
    a stand-in zfs first on its PATH that appends its arguments to the log."""
    directory = tmp_path_factory.mktemp("receiver")
    log = directory / "zfs.log"
    fake = directory / "zfs"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%%s]" "$a"; done >> %s\necho >> %s\n' % (log, log))
    fake.chmod(0o755)
    script = directory / "pg_zfs_receive"
    text = snap.receiver_script()
    assert text.count("\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n") == 1
    script.write_text(text.replace("\nPATH=/usr/sbin:", "\nPATH=%s:/usr/sbin:" % directory))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def run(command, shell="sh"):
        if log.exists():
            log.unlink()
        env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command, "SSH_CLIENT": "127.0.0.5 40000 22"}
        return subprocess.run([shell, str(script), "bk/g1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    run.log = log
    return run


@pytest.mark.parametrize("command, argv", [
    ("zfs get -rHp -o name,property,value guid,pgzfs:set,pgzfs:stop_lsn bk/g1",
     "[get][-rHp][-o][name,property,value][guid,pgzfs:set,pgzfs:stop_lsn][bk/g1]"),
    ("zfs recv -u -d bk/g1", "[receive][-u][-d][bk/g1]"),
    ("zfs recv -s -u -d bk/g1", "[receive][-s][-u][-d][bk/g1]"),
    ("zfs recv -A bk/g1/data02", "[receive][-A][bk/g1/data02]"),
    ("zfs destroy bk/g1/data02@" + SET, "[destroy][bk/g1/data02@%s]" % SET),
    ("zfs set 'pgzfs:datasets=zp1/data01 zp1/data02' bk/g1/data01@%s bk/g1/data02@%s" % (SET, SET),
     "[set][pgzfs:datasets=zp1/data01 zp1/data02][bk/g1/data01@%s][bk/g1/data02@%s]" % (SET, SET)),
    ("zfs set 'pgzfs:backup_label=U1RBUlQgV0FMIExPQ0FUSU9OOiAwLzUwMDAwMjg+/w==' bk/g1/data02@" + SET,
     "[set][pgzfs:backup_label=U1RBUlQgV0FMIExPQ0FUSU9OOiAwLzUwMDAwMjg+/w==][bk/g1/data02@%s]" % SET),
])
@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_receiver_runs_replicates_commands_below_its_parent(receiver, command, argv, shell):
    done = receiver(command, shell)
    assert (done.returncode, done.stderr) == (0, "")
    assert receiver.log.read_text() == argv + "\n"


@pytest.mark.parametrize("command", [
    "id",
    "",
    "sh -c id",
    "zfs list",
    "zfs destroy bk/g1",
    "zfs destroy bk/g1/data02",
    "zfs destroy -r bk/g1/data02@" + SET,
    "zfs destroy bk/g1/data02@manual",
    "zfs destroy bk/other/data02@" + SET,
    "zfs destroy bk/g1/../x/data02@" + SET,
    "zfs destroy bk/g1/data02@%s;id" % SET,
    "zfs destroy bk/g1/data02@%s$(id)" % SET,
    "zfs destroy bk/g1/data02@%s bk/g1/data01@%s" % (SET, SET),
    "zfs recv -u -d bk",
    "zfs recv -u -d bk/g10",
    "zfs recv -u -d bk/g1/x",
    "zfs recv -F -u -d bk/g1",
    "zfs recv bk/g1/data02",
    "zfs recv -A bk/other",
    "zfs get -rHp -o name,property,value guid bk",
    "zfs get -rHp -o name,property,value guid,* bk/g1",
    "zfs get all bk/g1",
    "zfs set 'mountpoint=/etc' bk/g1/data02",
    "zfs set 'pgzfs:x=1' bk/g1/data02",
    "zfs set 'pgzfs:x=1' bk/other/data02@" + SET,
    "zfs set 'pgzfs:x=$(id)' bk/g1/data02@" + SET,
    "zfs set 'pgzfs:x=1' bk/g1/data02@%s;id" % SET,
    "zfs set 'pgzfs:x=1' 'bk/g1/data02@%s'" % SET,
    "zfs set 'pgzfs:x=1'",
    "zfs set pgzfs:x=1 bk/g1/data02@" + SET,
    "zfs get -rHp -o name,property,value guid bk/g1\nid",
])
def test_the_receiver_refuses_anything_else_and_runs_nothing(receiver, command):
    done = receiver(command)
    assert done.returncode == 1
    assert done.stderr.startswith("pg_zfs_receive: refused: ") and len(done.stderr.splitlines()) == 1
    assert not receiver.log.exists()


# -- btrfs: the layout, the listing, what a run deletes and writes ---------------------------

BT = ("/srv/bt/data01", "/srv/bt/data02")
UUIDS = {"/srv/bt/data01@pgzfs_" + STAMPS[0]: "u1-a", "/srv/bt/data02@pgzfs_" + STAMPS[0]: "u2-a",
         "/srv/bt/data01@pgzfs_" + STAMPS[1]: "u1-b", "/srv/bt/data02@pgzfs_" + STAMPS[1]: "u2-b"}


def bt_metadata(name, **extra):
    found = props(name, BT, pgdata_dataset="/srv/bt/data02", **extra)
    return found


def bt_listing(entries):
    """pg_zfs_receive's btrfs listing: (NAME@SET, received UUID, flags, metadata dict or None)."""
    lines = []
    for name, received, flags, metadata in entries:
        lines.append("subvolume %s %s %s" % (name, received, flags))
        if metadata is not None:
            lines.append("metadata %s %s" % (name, "".join(json.dumps(metadata, indent=1).splitlines())))
    return "\n".join(lines) + "\n"


def test_a_btrfs_subvolume_lands_as_target_name_and_two_with_one_name_are_refused(snap):
    assert snap.replica_dataset("/srv/replica/g1", "/srv/bt/data02") == "/srv/replica/g1/data02"
    assert snap.replica_layout_problem(list(BT)) is None
    assert "would both be TARGET/data02" in snap.replica_layout_problem(["/srv/a/data02", "/srv/b/data02"])
    for path in ("/srv/my data/data02", "/srv/.hidden/data02", "/srv/bt/da$ta"):
        assert "is not an absolute path of letters" in snap.replica_layout_problem([path])


@pytest.mark.parametrize("path", ["/srv/replica/g1", "/r", "/srv/r-1/g_1.x:y"])
def test_a_btrfs_target_is_an_absolute_path_of_plain_components(snap, path):
    assert snap.btrfs_path_problem(path) is None


@pytest.mark.parametrize("path", ["/", "srv/replica", "/srv/replica/", "/srv//replica", "/srv/../etc", "/srv/./r",
                                  "/srv/.pgzfs", "/srv/a b", "/srv/a;id", "/srv/a@b"])
def test_a_btrfs_target_the_receiver_would_refuse_is_refused(snap, path):
    assert snap.btrfs_path_problem(path)


def test_the_btrfs_listing_gives_the_read_only_copies_as_rows_and_their_received_uuids(snap):
    a, b = ("pgzfs_" + stamp for stamp in STAMPS[:2])
    text = bt_listing([
        ("data01@" + a, "u1-a", "readonly", bt_metadata(a, copy_of="/srv/bt/data01")),
        ("data02@" + a, "u2-a", "readonly", bt_metadata(a, copy_of="/srv/bt/data02")),
        ("data02@" + b, "-", "-", None),                       # a receive cut short
        ("data01@" + b, "-", "readonly", None),                # made there by hand
    ]) + "metadata data02@%s not json\n" % b + "subvolume ../x@%s - readonly\n" % b
    rows, guids, subvolumes = snap.parse_btrfs_listing(text, "/r/g1")
    assert [(dataset, name) for dataset, name, _, _ in rows] == [
        ("/r/g1/data01", a), ("/r/g1/data02", a), ("/r/g1/data01", b)]
    assert rows[0][3]["copy_of"] == "/srv/bt/data01" and rows[2][3] == {}
    assert guids == {"/r/g1/data01@" + a: "u1-a", "/r/g1/data02@" + a: "u2-a", "/r/g1/data02@" + b: "-",
                     "/r/g1/data01@" + b: "-"}
    assert subvolumes["/r/g1/data02@" + b] == (None, False)
    [one] = snap.replica_sets(rows, "pgzfs", "/r/g1", list(BT))
    assert (one.name, one.complete, one.datasets) == (a, True, ("/r/g1/data01", "/r/g1/data02"))
    assert one.sources == {"/r/g1/data01": "/srv/bt/data01", "/r/g1/data02": "/srv/bt/data02"}


def test_a_set_without_copy_of_below_the_target_is_not_a_copy(snap):
    # On btrfs a copy's name is the basename of the subvolume here: a set of the
    # replica's own below the target, named alike, would otherwise pass as ours.
    a = "pgzfs_" + STAMPS[0]
    rows = [("/r/g1/data02", a, 0, props(a, ("/r/g1/data02",), pgdata_dataset="/r/g1/data02"))]
    assert snap.group_sets(rows, "pgzfs")[0].complete
    assert snap.replica_sets(rows, "pgzfs", "/r/g1", ["/srv/bt/data02"]) == []


def test_the_leftovers_of_a_cut_receive_are_our_writable_copies_without_another_uuid(snap):
    a, b = ("pgzfs_" + stamp for stamp in STAMPS[:2])
    subvolumes = collections.OrderedDict([
        ("/r/g1/data01@" + a, ("u1-a", True)),         # arrived
        ("/r/g1/data02@" + b, (None, False)),          # cut: no received UUID
        ("/r/g1/data01@" + b, ("u1-b", False)),        # cut between its last two steps
        ("/r/g1/data01@" + a + "x", (None, False)),    # not a set name
        ("/r/g1/data03@" + b, (None, False)),          # not a copy of ours
        ("/r/g1/data02@other_" + STAMPS[1], (None, False)),    # another prefix
        ("/r/g1/data02@" + a, ("someone", False)),     # another UUID: not ours to delete
        ("/r/g1/data01@pgzfs_" + STAMPS[2], (None, True)),     # read-only: never
    ])
    assert snap.btrfs_leftovers(subvolumes, "/r/g1", "pgzfs", list(BT), UUIDS) == [
        "/r/g1/data02@" + b, "/r/g1/data01@" + b]


def test_a_btrfs_run_sends_from_the_newest_copy_with_the_uuid_and_a_copy_of_another_is_a_problem(snap):
    a, b = ("pgzfs_" + stamp for stamp in STAMPS[:2])
    sets = snap.group_sets([(d, n, 0, bt_metadata(n)) for n in (a, b) for d in BT], "pgzfs")
    text = bt_listing([("data01@" + a, "u1-a", "readonly", bt_metadata(a, copy_of=BT[0])),
                       ("data02@" + a, "u2-a", "readonly", bt_metadata(a, copy_of=BT[1]))])
    rows, guids, _ = snap.parse_btrfs_listing(text, "/r/g1")
    there = snap.replica_sets(rows, "pgzfs", "/r/g1", list(BT))
    common, plan, problems = snap.plan_replication(sets, UUIDS, there, guids, [], "/r/g1")
    assert (common.name, problems) == (a, [])
    assert plan[0][1] == [snap.Send(BT[0] + "@" + b, BT[0] + "@" + a, "/r/g1/data01"),
                          snap.Send(BT[1] + "@" + b, BT[1] + "@" + a, "/r/g1/data02")]
    assert snap.btrfs_send_argv("btrfs", BT[1] + "@" + b, BT[1] + "@" + a) == [
        "btrfs", "send", "-q", "-p", "/srv/bt/.pgzfs/data02@" + a, "/srv/bt/.pgzfs/data02@" + b]
    assert snap.btrfs_send_argv("btrfs", BT[1] + "@" + a) == ["btrfs", "send", "-q", "/srv/bt/.pgzfs/data02@" + a]
    # A read-only copy without our UUID where the next set's copy goes: not ours to replace.
    text += "subvolume data02@%s - readonly\n" % b
    rows, guids, _ = snap.parse_btrfs_listing(text, "/r/g1")
    _, _, problems = snap.plan_replication(sets, UUIDS, there, guids, [], "/r/g1")
    assert problems == ["/r/g1/data02@%s exists there with another GUID than %s@%s: not a copy of it"
                        % (b, BT[1], b)]


def test_the_uuid_a_copy_gets_is_the_snapshots_own_or_the_one_it_was_received_with(snap):
    show = ("/srv/bt/.pgzfs/data02@s\n\tName: \t\t\tdata02@s\n\tUUID: \t\t\t33654675-67da\n"
            "\tParent UUID: \t\t654d9bc5-8a11\n\tReceived UUID: \t\t-\n\tFlags: \t\t\treadonly\n")
    assert snap.sent_uuid(show) == "33654675-67da"
    assert snap.sent_uuid(show.replace("Received UUID: \t\t-", "Received UUID: \t\tabc-1")) == "abc-1"
    assert snap.sent_uuid("ERROR: not a subvolume") is None


def test_a_copys_metadata_is_the_snapshots_without_replicated_to_plus_copy_of(snap):
    a = "pgzfs_" + STAMPS[0]
    text = snap.replica_metadata_text(bt_metadata(a, replicated_to="r1 r2", backup_label=""), "/srv/bt/data02")
    found = json.loads(text)
    assert found == dict(bt_metadata(a, backup_label=""), copy_of="/srv/bt/data02")
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:.,_@ -{}\"\n")
    for value in ("it's", "a$(id)", "x\ny", "caf\u00e9"):
        with pytest.raises(ValueError):
            snap.replica_metadata_text(bt_metadata(a, pgdata_rel=value), "/srv/bt/data02")
    with pytest.raises(ValueError):
        snap.replica_metadata_text(bt_metadata(a, backup_label="QUFB" * 20000), "/srv/bt/data02")


def test_a_failed_side_is_named_by_its_error_not_by_btrfs_chatter(snap):
    assert snap.failure_line("Chroot to /r/g1/.pgzfs\nAt snapshot data02@s\n", 255) == "exit code 255"
    assert snap.failure_line("At subvol data02@s\nERROR: creating snapshot failed: File exists\n", 1) == \
        "ERROR: creating snapshot failed: File exists"


def test_the_authorized_keys_line_of_a_btrfs_replica_names_its_target_path(snap):
    line = snap.receiver_keys_line("ssh-ed25519 AAAAC3Nz guest\n", "192.168.122.10", "/srv/replica/g1")
    assert line == ('restrict,from="192.168.122.10",command="/usr/local/bin/pg_zfs_receive /srv/replica/g1" '
                    'ssh-ed25519 AAAAC3Nz guest')
    for parent in ("/srv/replica/g1;id", "/srv/../g1", "/"):
        with pytest.raises(snap.Failure):
            snap.receiver_keys_line("ssh-ed25519 AAAAC3Nz", "10.0.0.1", parent)


# -- pg_zfs_receive on btrfs, by sh, with a btrfs that prints its arguments ------------------

FAKE_BTRFS = r"""#!/bin/sh
# A stand-in btrfs: logs its arguments; a directory is a "subvolume" whose
# received UUID and flags are in its files received and flags.
for a in "$@"; do printf "[%%s]" "$a"; done >> %(log)s
echo >> %(log)s
case "$1 $2" in
"subvolume show")
    [ -d "$3" ] || { echo "ERROR: Not a Btrfs subvolume" >&2; exit 1; }
    printf "%%s\n\tName: \t\t\t%%s\n\tUUID: \t\t\tu-%%s\n\tReceived UUID: \t\t%%s\n\tFlags: \t\t\t%%s\n" \
        "$3" "${3##*/}" "${3##*/}" "$(cat "$3/received" 2>/dev/null || echo -)" "$(cat "$3/flags" 2>/dev/null || echo -)" ;;
"subvolume delete") rm -r "$3" ;;
"receive -C") cat > "$3/received.stream" ;;
esac
"""


@pytest.fixture(scope="module")
def bt_receiver(snap, tmp_path_factory):
    """(run(command, input) -> CompletedProcess): pg_zfs_receive for the parent
    run.parent (a directory) with a stand-in btrfs first on its PATH (run.log)."""
    directory = tmp_path_factory.mktemp("receiver_btrfs")
    log = directory / "btrfs.log"
    fake = directory / "btrfs"
    fake.write_text(FAKE_BTRFS % {"log": log})
    fake.chmod(0o755)
    script = directory / "pg_zfs_receive"
    script.write_text(snap.receiver_script().replace("\nPATH=/usr/sbin:", "\nPATH=%s:/usr/sbin:" % directory))
    script.chmod(0o755)
    parent = directory / "g1"

    def run(command, shell="sh", input=""):
        if log.exists():
            log.unlink()
        env = {"PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command, "SSH_CLIENT": "127.0.0.5 40000 22"}
        return subprocess.run([shell, str(script), str(parent)], env=env, stdout=subprocess.PIPE, input=input,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    run.log, run.parent, run.snapshots = log, str(parent), parent / ".pgzfs"
    return run


def make_copy(run, name, received="-", flags="readonly", metadata=None):
    copy = run.snapshots / name
    copy.mkdir(parents=True)
    (copy / "received").write_text(received)
    (copy / "flags").write_text(flags)
    if metadata is not None:
        (run.snapshots / (name + ".json")).write_text(metadata)
    return copy


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_btrfs_receiver_lists_receives_deletes_and_writes_below_its_target(bt_receiver, shell):
    run = bt_receiver
    shutil.rmtree(run.parent, ignore_errors=True)
    os.makedirs(run.parent)
    done = run("pgzfs-list %s" % run.parent, shell)        # nothing received yet
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # btrfs receive, chrooted into TARGET/.pgzfs, made 0700 by the first receive
    done = run("btrfs receive %s/.pgzfs" % run.parent, shell, input="stream")
    assert (done.returncode, done.stderr) == (0, "")
    assert run.log.read_text() == "[receive][-C][%s/.pgzfs]\n" % run.parent
    assert stat.S_IMODE(os.stat(str(run.snapshots)).st_mode) == 0o700
    assert (run.snapshots / "received.stream").read_text() == "stream"
    metadata = '{\n "copy_of": "/srv/bt/data02",\n "set": "%s"\n}\n' % SET
    make_copy(run, "data02@" + SET, "u-2", "readonly", metadata)
    make_copy(run, "data01@" + SET, "-", "-")
    make_copy(run, "data01@manual")
    (run.snapshots / ".data02@x.json.1.tmp").write_text("{}")
    done = run("pgzfs-list %s" % run.parent, shell)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("subvolume data01@%s - -\nsubvolume data02@%s u-2 readonly\n"
                           'metadata data02@%s { "copy_of": "/srv/bt/data02", "set": "%s"}\n' % (SET, SET, SET, SET))
    rows, guids, _ = load_script("pg_zfs_snap").parse_btrfs_listing(done.stdout, run.parent)
    assert rows[0][3] == {"copy_of": "/srv/bt/data02", "set": SET}
    # the metadata from stdin, atomically, replacing the one there
    path = "%s/.pgzfs/data02@%s.json" % (run.parent, SET)
    done = run("pgzfs-write " + path, shell, input=metadata.replace("data02", "data2"))
    assert (done.returncode, done.stderr) == (0, "")
    assert open(path).read() == metadata.replace("data02", "data2")
    assert sorted(os.listdir(str(run.snapshots))) == sorted([
        ".data02@x.json.1.tmp", "data01@" + SET, "data01@manual", "data02@" + SET, "data02@%s.json" % SET,
        "received.stream"])
    # a copy, then its metadata
    done = run("pgzfs-delete %s/.pgzfs/data02@%s" % (run.parent, SET), shell)
    assert (done.returncode, done.stderr) == (0, "")
    assert not os.path.exists(path) and not (run.snapshots / ("data02@" + SET)).exists()
    assert "[subvolume][delete][%s/.pgzfs/data02@%s]\n" % (run.parent, SET) in run.log.read_text()
    done = run("pgzfs-write " + path, shell, input=metadata)     # its copy is gone: nothing to describe
    assert done.returncode == 1 and done.stderr.startswith("pg_zfs_receive: no copy ")
    assert not os.path.exists(path)


@pytest.mark.parametrize("command, input", [
    ("id", ""),
    ("", ""),
    ("zfs get -rHp -o name,property,value guid {parent}", ""),
    ("zfs recv -u -d {parent}", ""),
    ("pgzfs-list", ""),
    ("pgzfs-list /", ""),
    ("pgzfs-list {parent}/..", ""),
    ("pgzfs-list {parent} {parent}", ""),
    ("btrfs receive {parent}", ""),
    ("btrfs receive -e {parent}/.pgzfs", ""),
    ("btrfs receive {parent}/.pgzfs/x", ""),
    ("btrfs subvolume delete {parent}/.pgzfs/data02@" + SET, ""),
    ("pgzfs-delete {parent}/.pgzfs/data02@manual", ""),
    ("pgzfs-delete {parent}/.pgzfs/.data02@" + SET, ""),
    ("pgzfs-delete {parent}/.pgzfs/x/data02@" + SET, ""),
    ("pgzfs-delete {parent}/.pgzfs/../.pgzfs/data02@" + SET, ""),
    ("pgzfs-delete {parent}/data02@" + SET, ""),
    ("pgzfs-delete {parent}/.pgzfs/data02@%s@%s" % (SET, SET), ""),
    ("pgzfs-delete {parent}/.pgzfs/data02@%s;id" % SET, ""),
    ("pgzfs-delete {parent}/.pgzfs/data02@%s $(id)" % SET, ""),
    ("pgzfs-write {parent}/.pgzfs/data02@" + SET, "{}"),
    ("pgzfs-write {parent}/.pgzfs/data02@%s.txt" % SET, "{}"),
    ("pgzfs-write {parent}/.pgzfs/clones/x.json", "{}"),
    ("pgzfs-write {parent}/.pgzfs/data02@%s.json" % SET, '{"set": "$(id)"}'),
    ("pgzfs-write {parent}/.pgzfs/data02@%s.json" % SET, '{"set": "a\\\\b"}'),
    ("pgzfs-write {parent}/.pgzfs/data02@%s.json" % SET, "{'set': 1}"),
    ("pgzfs-write {parent}/.pgzfs/data02@%s.json" % SET, "{" + " " * 65536 + "}"),
    ("pgzfs-list {parent}\nid", ""),
])
def test_the_btrfs_receiver_refuses_anything_else_and_changes_nothing(bt_receiver, command, input):
    run = bt_receiver
    shutil.rmtree(run.parent, ignore_errors=True)
    make_copy(run, "data02@" + SET, "u-2", "readonly", "{}")
    make_copy(run, "data02@manual")
    before = sorted((str(path), path.read_text() if path.is_file() else "") for path in run.snapshots.rglob("*"))
    done = run(command.format(parent=run.parent), input=input)
    assert done.returncode == 1
    assert done.stderr.startswith("pg_zfs_receive: refused: ") and len(done.stderr.splitlines()) == 1
    assert not run.log.exists() or "delete" not in run.log.read_text()
    assert sorted((str(path), path.read_text() if path.is_file() else "")
                  for path in run.snapshots.rglob("*")) == before


@pytest.mark.parametrize("parent", ["/", "/srv//r", "/srv/r/", "/srv/../r", "/srv/.r", "/srv/r x", "/srv/r;id"])
def test_the_btrfs_receiver_refuses_a_target_that_is_not_a_plain_absolute_path(snap, tmp_path, parent):
    script = tmp_path / "pg_zfs_receive"
    script.write_text(snap.receiver_script())
    done = subprocess.run(["sh", str(script), parent], env={"SSH_ORIGINAL_COMMAND": "pgzfs-list " + parent},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert done.returncode == 1 and done.stderr.startswith("pg_zfs_receive: refused: not an absolute path")
