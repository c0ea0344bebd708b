"""The harness the tests and the benchmarks share: real processes on free ports (`softserve serve`, an in-process
server, `redis-server`) and random T5 checkpoints written as the hub lays them out. Nothing in the server imports
it."""
