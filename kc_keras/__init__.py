"""kc-keras: knowledge concentration for Keras.

A generalist and one specialist per vertical teach one small student, which
is then quantized and exported to TFLite for phones and edge boards.
"""

__version__ = "0.1.0"
