"""Session 14: bench.load_test with one more door, `gradio-noverify`: gradio_client built with ssl_verify=False, so
the httpx clients it builds for every request make no TLS context (an http:// URL never uses one). Same flags as
bench.load_test.

    python3 bench/results/cpu/s14_gradio_client_noverify.py --url http://127.0.0.1:7891/ --doors gradio-noverify,gradio ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import load_test  # noqa: E402


class GradioNoVerify(load_test.GradioDoor):
    name = "gradio-noverify"

    def connect(self) -> load_test.GradioChat:
        from gradio_client import Client

        return load_test.GradioChat(Client(self.url, verbose=False, ssl_verify=False), self.poll_s)


load_test.DOORS["gradio-noverify"] = GradioNoVerify
if __name__ == "__main__":
    sys.exit(load_test.main(sys.argv[1:]))
