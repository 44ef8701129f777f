.PHONY: setup demo compare-demo test
setup:  ## create .venv and install everything
	bash scripts/setup.sh
demo:   ## the main job: the real system (broker, cloud, 3 devices) for 3 rounds on real weights
	bash scripts/demo.sh
compare-demo:  ## in-process FedNano vs FedAvg on the real base (no broker or cloud processes)
	bash scripts/compare-demo.sh
test:   ## lint, types, unit + integration tests, the fleet end to end (what CI runs)
	bash scripts/test.sh
