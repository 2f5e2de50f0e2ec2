"""The built-in default: a synthetic audio-caption corpus, and the small audio encoder and LLM the
project trains on it, so that every stage runs offline on a CPU. The framework never imports this
package; only the command line does (``slit data synth``, ``slit bootstrap``)."""
