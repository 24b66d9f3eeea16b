# The two commands a fresh machine needs (see README.md).
.PHONY: run test build bench

run:
	cargo run --release -p nvstack -- serve

test:
	bash scripts/test.sh

build:
	cargo build --workspace --release

bench:
	bash bench/run-all.sh
