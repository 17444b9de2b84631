"""Server-side commands: run the server, and work on a data folder (verify, backup, restore,
keys check), each beside or instead of a running server."""
from __future__ import annotations

import datetime
import json
import os
import sys

from .text import UsageError, fen, table
from cardcore.idempotency import REQUEST_WINDOW_S_DEFAULT

# The gRPC process's event loop. grpc.aio runs on any asyncio loop; uvloop's (libuv, a hard
# dependency) does the loop's own work in C: the default where measured cheaper (README, "Where
# the time goes").
EVENT_LOOPS = ("uvloop", "asyncio")
EVENT_LOOP_DEFAULT = "uvloop"


def event_loop_factory(name: str):
    """A new event loop of ``name`` (EVENT_LOOPS), for asyncio.Runner."""
    import asyncio  # (here and in cmd_serve: the client commands that import this module do not
    #               need it)

    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def cmd_serve(args) -> int:
    import asyncio

    from .app import ServerConfig, StartupError, WriterFailed, serve

    cfg = ServerConfig(log_level=args.log_level, log_format=args.log_format, data_dir=args.data_dir,
                       listen=args.listen, program_path=args.program, keyring_path=args.keyring,
                       insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_client_ca=args.tls_client_ca,
                       failures_per_minute=args.failures_per_minute, sync=not args.no_sync,
                       group_max_ops=args.group_max_ops, group_wait_us=args.group_wait_us,
                       queue_max_ops=args.queue_max_ops, groups_in_flight=args.groups_in_flight,
                       map_size_mib=args.map_size_mib, metrics_listen=args.metrics_listen,
                       request_window_s=(args.request_window_hours
                                         or REQUEST_WINDOW_S_DEFAULT // 3600) * 3600,
                       request_window_given=args.request_window_hours is not None,
                       reader_check_s=args.reader_check_s, checkpoint_ms=args.checkpoint_ms,
                       checkpoint_ops=args.checkpoint_ops,
                       log_segment_mib=args.log_segment_mib,
                       day_totals=not args.no_day_totals,
                       member_metrics=not args.no_member_metrics)
    if args.cluster:
        files = shard_paths(args.shard, args.nats_ca, args.nats_cert, args.nats_key,
                            args.follower_cert, args.follower_key)
        if not args.nats:
            print("cardcore serve --cluster: --nats URL[,URL...] (or CARDCORE_NATS_URLS) is "
                  "needed", file=sys.stderr)
            return 2
        if any(files) and not all(files):
            print("cardcore serve --cluster: --nats-ca, --nats-cert, --nats-key, "
                  "--follower-cert and --follower-key go together", file=sys.stderr)
            return 2
        cfg.cluster_nats = [u for u in args.nats.split(",") if u]
        cfg.cluster_shard = args.shard
        if args.shard in (args.card_shards or ()):
            print(f"cardcore serve --cluster: --shard {args.shard} is the admin shard with "
                  "--card-shards: not one of them", file=sys.stderr)
            return 2
        cfg.cluster_card_shards = args.card_shards or ()
        cfg.follower_seed_from = args.follower_seed_from
        cfg.submit_timeout_ms = args.submit_timeout_ms
        if all(files):  # (the followers' paths: each substitutes its own shard)
            cfg.nats_tls, cfg.follower_tls = files[:3], (args.follower_cert, args.follower_key)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
            runner.run(serve(cfg))
    except StartupError as exc:
        print(f"cardcore: {exc}", file=sys.stderr)
        return 2
    except WriterFailed as exc:
        print(f"cardcore: stopped because the writer failed: {exc}", file=sys.stderr)
        return 1
    return 0


def shard_paths(shard: int, *paths: str | None) -> tuple[str | None, ...]:
    """NATS TLS paths with ``{shard}`` standing for the process's --shard: one environment
    file (replica.env, front.env, as cluster-config writes them) serves a host's processes of
    every shard, each with its own shard's certificate."""
    return tuple(p.replace("{shard}", str(shard)) if p else p for p in paths)


def cmd_replica(args) -> int:
    """Cluster: one shard's replica (docs/cluster.md); the NATS client is imported only here."""
    from cardcore.jetlog import NatsRefused, NatsTLS, NatsUnavailable

    from .replica import SETTING_ERRORS, ReplicaConfig, SeedError, replica_main

    if not args.nats:
        print("cardcore replica: --nats URL[,URL...] (or CARDCORE_NATS_URLS) is needed",
              file=sys.stderr)
        return 2
    files = shard_paths(args.shard, args.nats_ca, args.nats_cert, args.nats_key)
    if any(files) and not all(files):
        print("cardcore replica: --nats-ca, --nats-cert and --nats-key go together",
              file=sys.stderr)
        return 2

    from cardcore.durable import log_folder

    if os.path.isdir(log_folder(os.path.join(args.data_dir, "ledger"))):
        print(f"cardcore replica: {args.data_dir} is a single server's data folder (its ledger "
              "keeps a local group log): a replica needs a folder of its own (--data-dir), "
              "empty or a replica's", file=sys.stderr)
        return 2
    program = None
    if args.program:
        try:
            with open(args.program) as f:
                program = f.read()
        except OSError as exc:
            print(f"cardcore replica: --program: {exc}", file=sys.stderr)
            return 2
    cfg = ReplicaConfig(shard=args.shard, data_dir=args.data_dir,
                        nats_urls=[u for u in args.nats.split(",") if u], program=program,
                        stream_replicas=args.stream_replicas, lease_ms=args.lease_ms,
                        append_timeout_ms=args.append_timeout_ms,
                        group_max_ops=args.group_max_ops, checkpoint_ms=args.checkpoint_ms,
                        idle_maintenance_ms=args.idle_maintenance_ms,
                        nats_tls=NatsTLS(*files) if all(files) else None,
                        seed_from=args.seed_from,
                        retention_check_ms=args.retention_check_ms,
                        replica_stale_s=args.replica_stale_hours * 3600,
                        retain_groups=args.retain_groups, keyring_path=args.keyring,
                        follow_only=args.follow_only,
                        unchecked_through=args.unchecked_through,
                        admin_shard=args.admin_shard)
    try:
        return replica_main(cfg)
    except SeedError as exc:
        print(f"cardcore replica: --seed-from: {exc}", file=sys.stderr)
        return 2
    except SETTING_ERRORS as exc:  # a restart cannot help
        print(f"cardcore replica: {exc}", file=sys.stderr)
        return 2
    except NatsUnavailable as exc:
        # refused (a certificate, a user, a CA file): a setting to fix, exit 2, not restarted;
        # no server answered (the nodes are starting): exit 1, the supervisor tries again
        print(f"cardcore replica: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, NatsRefused) else 1


COPY_ATTEMPTS = 5


def _open_ledger(path: str, profile_key: bytes | None = None):
    """A ledger folder opened read-only (verify, backup and restore run beside a live server)."""
    from cardcore.ledger import Ledger, LedgerFormatError

    try:
        return Ledger(path, sync=False, readonly=True, profile_key=profile_key)
    except LedgerFormatError as exc:
        raise SystemExit(f"cardcore: {exc}") from None


def _ledger_in(folder: str, missing: str) -> str | None:
    """The ledger path inside a data or backup folder, or None (after saying so) if there is none."""
    path = os.path.join(folder, "ledger")
    if os.path.exists(os.path.join(path, "data.mdb")):
        return path
    print(f"{missing} at {folder}", file=sys.stderr)
    return None


def _keys_of(index_key: bytes | None) -> tuple[bytes | None, bytes | None]:
    """(the member index's key, the stored profiles' key) the writer derives from the
    keyring's index key; (None, None) without a keyring."""
    from cardcore.lookup import lookup_key as member_key
    from cardcore.profiles import profile_key

    if index_key is None:
        return None, None
    return member_key(index_key), profile_key(index_key)


def _verify_at(path: str, index_key: bytes | None = None) -> dict:
    """``index_key``: the keyring's, for the member index and the sealed profiles."""
    lookup_key, profile_key = _keys_of(index_key)
    ledger = _open_ledger(path, profile_key)
    try:
        return ledger.verify(lookup_key=lookup_key)
    finally:
        ledger.close()


def _catch_up(data_dir: str, path: str, ring) -> None:
    """Before a tool reads a ledger: with no server on the folder, replay what its group log
    holds past the last checkpoint (a server stopped by a crash or a power cut leaves that to its
    next start); beside a running server, LMDB is as of its last checkpoint (--checkpoint-ms)."""
    from cardcore.durable import behind

    from .app import StartupError, lock_data_dir

    if not behind(path):
        return
    try:
        lock = lock_data_dir(data_dir)
    except StartupError:
        print("a server is running on this folder: the ledger as of its last checkpoint",
              file=sys.stderr)
        return
    with lock:
        _replay_log(path, ring)


def _replay_log(path: str, ring) -> None:
    """(The data folder locked, no server on it.) The log's groups past the last checkpoint."""
    from cardcore.durable import catch_up
    n = catch_up(path, *_keys_of(ring.index_key if ring is not None else None))
    if n:
        print(f"replayed {n} groups of the log that the last checkpoint did not hold",
              file=sys.stderr)


def _copy_caught_up(src: str, dest: str, ring) -> None:
    """A compacted copy of the ledger at ``src``, then the groups its log holds past the copy's
    checkpoint (a server may be writing it): every group answered before the backup is in it."""
    import shutil

    from cardcore.durable import catch_up_copy, log_folder
    from cardcore.grouplog import LogError
    keys = _keys_of(ring.index_key if ring is not None else None)
    for attempt in range(COPY_ATTEMPTS):
        ledger = _open_ledger(src)
        try:
            ledger.backup(dest)
        finally:
            ledger.close()
        if not os.path.isdir(log_folder(src)):  # a cluster replica's: its log is the shard's
            return  # stream, which a replica seeded from this copy follows from its checkpoint
        try:
            catch_up_copy(dest, src, *keys)
            return
        except LogError:  # the writer recycled the log past the copy meanwhile: copy again
            shutil.rmtree(dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # never a half-made backup left behind
            raise
    raise SystemExit(f"cardcore: the ledger kept moving past each copy ({COPY_ATTEMPTS} tries)")


def _ring_of(args):
    """The keyring named, or the data folder's when it has one (a production keyring kept
    elsewhere must be named); None without."""
    given = getattr(args, "keyring", None)
    found = given or os.path.exists(os.path.join(args.data_dir, "keyring.json"))
    return _keyring(given, args.data_dir) if found else None


def _keyring(given: str | None, data_dir: str):
    """The keyring ``--keyring`` names (or the data folder's); a UsageError that names the file,
    never a key, when it cannot be read."""
    from cardcore.keyring import Keyring

    ring_path = given or os.path.join(data_dir, "keyring.json")
    try:
        return Keyring.load(ring_path)
    except OSError as exc:
        raise UsageError(f"--keyring {ring_path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError):  # never a key in the message
        raise UsageError(f"--keyring {ring_path}: not a cardcore keyring, or damaged") from None


def cmd_verify(args) -> int:
    path = _ledger_in(args.data_dir, "no ledger")
    if path is None:
        return 2
    # The member index (rule 17) is checked with the keyring
    ring = _ring_of(args)
    _catch_up(args.data_dir, path, ring)
    report = _verify_at(path, ring.index_key if ring is not None else None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table([
            ("ledger", path),
            ("result", "clean" if report["ok"] else "PROBLEMS FOUND"),
            ("cards", f"{report['cards']:,}"),
            ("journal entries", f"{report['journal_entries']:,}"),
            ("request records", f"{report['requests']:,}"),
            ("principal total", fen(report["principal_minor"])),
            ("bonus total", fen(report["bonus_minor"])),
            ("points total", f"{report['points']:,}"),
            ("program version", str(report["program_version"])),
            ("journal head digest", report["head_digest"]),
            ("member index", report["member_index"]),
        ]))
        for p in report["problems"]:
            print(f"  - {p}")
    return 0 if report["ok"] else 1


def cmd_backup(args) -> int:
    """Hot backup: a consistent, compacted copy of the ledger, verified, with a manifest."""
    src = _ledger_in(args.data_dir, "no ledger")
    if src is None:
        return 2
    if os.path.exists(args.to):
        print(f"{args.to} exists: a backup goes to a new folder", file=sys.stderr)
        return 2
    ring = _ring_of(args)
    _catch_up(args.data_dir, src, ring)
    _copy_caught_up(src, os.path.join(args.to, "ledger"), ring)
    report = _verify_at(os.path.join(args.to, "ledger"))
    manifest = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "source": os.path.abspath(src), "verify": report}
    with open(os.path.join(args.to, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(table([("backup", args.to), ("result", "clean" if report["ok"] else "PROBLEMS FOUND"),
                  ("cards", f"{report['cards']:,}"),
                  ("journal entries", f"{report['journal_entries']:,}"),
                  ("note", "keys are not in the backup: keep the keyring's own copy")]))
    return 0 if report["ok"] else 1


def cmd_restore(args) -> int:
    """Put a backup in place of a data folder's ledger (server stopped), carrying over terminal
    counters, revocations and operator removals from the ledger it replaces; verified before
    it is swapped in."""
    from cardcore.backup import RestoreError, restore

    from .app import StartupError, lock_data_dir

    src = _ledger_in(args.source, "no backup")
    if src is None:
        return 2
    os.makedirs(args.data_dir, exist_ok=True)
    try:
        lock = lock_data_dir(args.data_dir)
    except StartupError as exc:
        print(f"{exc}: stop it first", file=sys.stderr)
        return 2
    dest = os.path.join(args.data_dir, "ledger")
    with lock:
        if os.path.exists(os.path.join(dest, "data.mdb")):  # its counters are carried over
            _replay_log(dest, _ring_of(args))
        try:
            report = restore(src, dest, replace=args.force, lost_ledger=args.lost_ledger)
        except RestoreError as exc:
            print(f"cardcore: {exc}; nothing restored", file=sys.stderr)
            return 1 if "verify" in str(exc) else 2
    print(table([("restored", dest), ("cards", f"{report['cards']:,}"),
                  ("journal entries", f"{report['journal_entries']:,}"),
                  ("carried over", f"{report['carried']} terminal and operator changes")]))
    return 0


def cmd_migrate(args) -> int:
    """Upgrade a ledger of format 1 in place (the server does it at start too)."""
    from cardcore import migrate
    from cardcore.program import ProgramError, checked_program_file

    from .app import StartupError, lock_data_dir

    from cardcore import swap

    source = None
    if args.program:
        try:
            source = checked_program_file(args.program)
        except ProgramError as exc:
            print(f"cardcore: the program {args.program} is not valid: {exc}", file=sys.stderr)
            return 2
    try:
        lock = lock_data_dir(args.data_dir)
    except StartupError as exc:
        print(f"{exc}: stop it first", file=sys.stderr)
        return 2
    with lock:
        swap.recover(os.path.join(args.data_dir, "ledger"))  # under the lock: no swap runs now
        path = _ledger_in(args.data_dir, "no ledger")
        if path is None:
            return 2
        if migrate.ledger_format(path) == 2:
            print(f"{path} is already of format 2")
            return 0
        try:
            report = migrate.migrate(path, source)
        except migrate.MigrationError as exc:
            print(f"cardcore: {exc}; the ledger is unchanged", file=sys.stderr)
            return 1
    after = report["after"]
    print(table([("migrated", path), ("format", "1 -> 2"), ("cards", f"{after['cards']:,}"),
                 ("journal entries", f"{after['journal_entries']:,} (one more: the program, v1)"),
                 ("request records", f"{after['requests']:,}"),
                 ("result", "clean"), ("format 1 kept at", report["v1_kept_at"])]))
    return 0


def keys_check(args) -> int:
    """Offline check: every stored card number opens under the keyring and hashes to its card id."""
    import collections

    from cardcore import cards
    from cardcore.keyring import Keyring, SealError

    path = _ledger_in(args.data_dir, "no ledger")
    if path is None:
        return 2
    ring = _keyring(args.keyring, args.data_dir)
    ledger = _open_ledger(path)
    versions: collections.Counter = collections.Counter()
    bad = 0
    try:
        after = b""
        while chunk := ledger.read_sealed(after, 1000):
            after = chunk[-1][0]
            for card_id, sealed in chunk:
                versions[Keyring.sealed_version(sealed)] += 1
                try:
                    ok = cards.card_id(ring.index_key, ring.unseal(card_id, sealed)) == card_id
                except SealError:
                    ok = False
                bad += not ok
    finally:
        ledger.close()
    by_version = ", ".join(f"v{v}: {n:,}" for v, n in sorted(versions.items())) or "none"
    print(table([("card numbers", f"{sum(versions.values()):,}"), ("by key version", by_version),
                  ("current version", str(ring.data_key_current)),
                  ("result", "clean" if not bad else f"{bad:,} DO NOT OPEN")]))
    return 0 if not bad else 1
