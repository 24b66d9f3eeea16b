# The two commands a fresh machine needs (see README.md).
.PHONY: run test build bench

run:
	cargo run --release -p nvstack -- perf --bdev file:./nvstack-data/disk0.img:1G -q 32 -o 4096 -w randrw -t 10

test:
	bash scripts/test.sh

build:
	cargo build --workspace --release

bench:
	bash bench/run-all.sh
