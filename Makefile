.PHONY: setup demo compare-demo test images images-offline stack-run
setup:  ## create .venv and install everything
	bash scripts/setup.sh
demo:   ## the main job: the real system (broker, cloud, 3 devices) for 3 rounds on real weights
	bash scripts/demo.sh
compare-demo:  ## in-process FedNano vs FedAvg on the real base (no broker or cloud processes)
	bash scripts/compare-demo.sh
test:   ## lint, types, unit + integration tests, the fleet end to end (what CI runs)
	bash scripts/test.sh
images:  ## build every image of docker-compose.yml (official base images, PyPI)
	bash scripts/build-images.sh
images-offline:  ## the same without a registry or index: Debian packages + a wheelhouse
	bash scripts/build-images.sh --offline
stack-run:  ## the compose stack for real: build, rounds, kills, checks, teardown (Docker)
	bash scripts/stack-run.sh --offline
