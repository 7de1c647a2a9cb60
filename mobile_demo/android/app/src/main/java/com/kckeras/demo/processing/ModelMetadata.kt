package com.kckeras.demo.processing

import org.json.JSONException
import org.json.JSONObject
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** Invalid model file or metadata; the message is shown to the user. */
class ModelMetadataException(message: String) : Exception(message)

/** Asset names that `make android-assets` and the copyKcAssets task write. */
object Assets {
    const val MODEL_ASSET = "model.tflite"
    const val METADATA_ASSET = "model.json"
    const val LABELS_ASSET = "labels.txt"
}

/**
 * The kc_keras metadata entry of an exported model (JSON layout in
 * docs/ARCHITECTURE.md). Every key is read through the require* helpers,
 * so tests/test_android_contract.py can list the keys the app depends on.
 */
class KcMetadata private constructor(root: JSONObject) {
    val name: String = root.optString("name", "model")
    val mode: String = root.optString("mode", "unknown mode")
    val labels: List<String> = requireStrings(root, "labels")
    val outputClasses: List<Int> = requireInts(root, "output_classes")
    val classNames: List<String> = requireStrings(root, "taxonomy.classes")
    val verticalNames: List<String> = requireStrings(root, "taxonomy.verticals")
    val classVertical: List<Int> = requireInts(root, "taxonomy.class_vertical")
    val height: Int = requireInt(root, "preprocessing.height")
    val width: Int = requireInt(root, "preprocessing.width")
    val channels: Int = requireInt(root, "preprocessing.channels")
    val inputType: TensorType = TensorType.fromName(requireString(root, "input.dtype"))
    val inputQuantization = QuantizationParams(
        requireDouble(root, "input.scale").toFloat(),
        requireInt(root, "input.zero_point")
    )
    val outputType: TensorType = TensorType.fromName(requireString(root, "output.dtype"))
    val outputQuantization = QuantizationParams(
        requireDouble(root, "output.scale").toFloat(),
        requireInt(root, "output.zero_point")
    )
    val outputKind: String = requireString(root, "output.kind")

    val pixelCount: Int get() = height * width * channels

    /** Returns the label, class and vertical of output `index`. */
    fun describe(index: Int, score: Float): Prediction {
        val classIndex = outputClasses[index]
        val vertical = if (classIndex >= 0) verticalNames[classVertical[classIndex]] else "other vertical"
        return Prediction(index, classIndex, labels[index], vertical, score)
    }

    /**
     * Checks the metadata against the loaded model and labels.txt.
     *
     * @param numOutputs size of the model's output vector.
     * @param classNamesFile lines of labels.txt, or null when it is absent.
     * @throws ModelMetadataException on any mismatch.
     */
    fun validate(numOutputs: Int, classNamesFile: List<String>?) {
        if (labels.size != numOutputs) {
            throw ModelMetadataException(
                "The metadata lists ${labels.size} labels but the model has $numOutputs outputs. " +
                    "Re-export the model so that there is one label per output."
            )
        }
        if (outputClasses.size != numOutputs) {
            throw ModelMetadataException(
                "The metadata lists ${outputClasses.size} output classes but the model has $numOutputs outputs."
            )
        }
        if (channels != 1 && channels != 3) {
            throw ModelMetadataException("The metadata gives $channels input channels; the demo supports 1 or 3.")
        }
        if (classNamesFile != null && classNamesFile != classNames) {
            throw ModelMetadataException(
                "${Assets.LABELS_ASSET} has ${classNamesFile.size} class names that differ from the model's " +
                    "${classNames.size}; run `make android-assets` again."
            )
        }
    }

    companion object {
        /** Parses the metadata JSON text. */
        fun fromJson(text: String): KcMetadata = try {
            KcMetadata(JSONObject(text))
        } catch (error: JSONException) {
            throw ModelMetadataException("The kc_keras metadata is not valid JSON (${error.message}).")
        }

        private fun parent(root: JSONObject, path: String): Pair<JSONObject, String> {
            val parts = path.split(".")
            var node = root
            for (part in parts.dropLast(1)) {
                node = node.optJSONObject(part) ?: throw missing(path)
            }
            if (!node.has(parts.last()) || node.isNull(parts.last())) throw missing(path)
            return Pair(node, parts.last())
        }

        private fun missing(path: String) = ModelMetadataException(
            "Invalid model metadata: \"$path\" is missing. Re-export the model with `kc tflite`."
        )

        private fun requireString(root: JSONObject, path: String): String {
            val (node, key) = parent(root, path)
            return node.getString(key)
        }

        private fun requireInt(root: JSONObject, path: String): Int {
            val (node, key) = parent(root, path)
            return node.getInt(key)
        }

        private fun requireDouble(root: JSONObject, path: String): Double {
            val (node, key) = parent(root, path)
            return node.getDouble(key)
        }

        private fun requireStrings(root: JSONObject, path: String): List<String> {
            val (node, key) = parent(root, path)
            val array = node.getJSONArray(key)
            return List(array.length()) { array.getString(it) }
        }

        private fun requireInts(root: JSONObject, path: String): List<Int> {
            val (node, key) = parent(root, path)
            val array = node.getJSONArray(key)
            return List(array.length()) { array.getInt(it) }
        }
    }
}

/**
 * Reads the metadata list of a .tflite flatbuffer without a TFLite runtime
 * (the same walk as mobile_demo/benchmark.py read_metadata). Field numbers
 * follow the TFLite schema: Model.buffers = 4, Model.metadata = 6,
 * Metadata.name = 0, Metadata.buffer = 1, Buffer.data = 0.
 */
object TfliteMetadata {
    const val METADATA_NAME = "kc_keras"

    private fun uoffset(data: ByteBuffer, pos: Int) = pos + data.getInt(pos)

    private fun field(data: ByteBuffer, table: Int, index: Int): Int? {
        val vtable = table - data.getInt(table)
        val vtableSize = data.getShort(vtable).toInt() and 0xFFFF
        val entry = 4 + 2 * index
        if (entry >= vtableSize) return null
        val offset = data.getShort(vtable + entry).toInt() and 0xFFFF
        return if (offset == 0) null else table + offset
    }

    // Start and length of the vector that a table field points to.
    private fun vector(data: ByteBuffer, fieldPos: Int): Pair<Int, Int> {
        val start = uoffset(data, fieldPos)
        return Pair(start + 4, data.getInt(start))
    }

    private fun bytesAt(data: ByteBuffer, start: Int, length: Int): ByteArray {
        val result = ByteArray(length)
        for (i in 0 until length) result[i] = data.get(start + i)
        return result
    }

    /**
     * Returns the metadata entries of a model as name -> content.
     *
     * @throws ModelMetadataException the bytes are not a TFLite model.
     */
    fun readEntries(model: ByteBuffer): Map<String, ByteArray> {
        val data = model.duplicate().order(ByteOrder.LITTLE_ENDIAN)
        if (data.limit() < 8 || String(bytesAt(data, 4, 4), Charsets.US_ASCII) != "TFL3") {
            throw ModelMetadataException("Not a TFLite model: the file identifier 'TFL3' is missing at byte 4.")
        }
        try {
            val root = uoffset(data, 0)
            val buffersField = field(data, root, 4) ?: return emptyMap()
            val metadataField = field(data, root, 6) ?: return emptyMap()
            val (buffersStart, _) = vector(data, buffersField)
            val (entriesStart, count) = vector(data, metadataField)
            val result = LinkedHashMap<String, ByteArray>()
            for (i in 0 until count) {
                val entry = uoffset(data, entriesStart + 4 * i)
                val nameField = field(data, entry, 0) ?: continue
                val bufferField = field(data, entry, 1) ?: continue
                val (nameStart, nameLength) = vector(data, nameField)
                val name = String(bytesAt(data, nameStart, nameLength), Charsets.UTF_8)
                val buffer = uoffset(data, buffersStart + 4 * data.getInt(bufferField))
                val dataField = field(data, buffer, 0)
                if (dataField == null) {
                    result[name] = ByteArray(0)
                } else {
                    val (start, length) = vector(data, dataField)
                    result[name] = bytesAt(data, start, length)
                }
            }
            return result
        } catch (error: IndexOutOfBoundsException) {
            throw ModelMetadataException("Corrupt TFLite model: its metadata could not be read. Re-export the model.")
        }
    }

    /**
     * Returns the kc_keras metadata of a model, or null when it has none.
     */
    fun readKcMetadata(model: ByteBuffer): KcMetadata? =
        readEntries(model)[METADATA_NAME]?.let { KcMetadata.fromJson(String(it, Charsets.UTF_8)) }
}
