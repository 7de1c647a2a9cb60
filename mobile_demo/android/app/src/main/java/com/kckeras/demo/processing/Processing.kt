package com.kckeras.demo.processing

// Pre- and post-processing of the kc-keras student, in plain Kotlin with no
// Android classes, so the unit tests run on any JVM. The arithmetic mirrors
// mobile_demo/benchmark.py (TFLiteModel) and the web demo's classifier.js.

/** Quantization of one tensor: real = (q - zeroPoint) * scale. */
data class QuantizationParams(val scale: Float, val zeroPoint: Int)

/** Element type of the model's input or output tensor. */
enum class TensorType(val min: Int, val max: Int) {
    INT8(-128, 127),
    UINT8(0, 255),
    FLOAT32(0, 0);

    companion object {
        /** Parses a dtype name as written in the kc_keras metadata. */
        fun fromName(name: String): TensorType = when (name) {
            "int8" -> INT8
            "uint8" -> UINT8
            "float32" -> FLOAT32
            else -> throw ModelMetadataException(
                "Unsupported tensor dtype \"$name\"; the demo supports int8, uint8 and float32."
            )
        }
    }
}

/** One entry of a top-k result. */
data class Prediction(
    val outputIndex: Int,
    val classIndex: Int,
    val label: String,
    val vertical: String,
    val score: Float
)

object ImageProcessing {
    /**
     * Center-crops ARGB pixels to the target aspect ratio and resizes them
     * with bilinear interpolation.
     *
     * @param argb source pixels in Android's Bitmap.getPixels layout.
     * @return width * height ARGB pixels.
     */
    fun centerCropResize(argb: IntArray, sourceWidth: Int, sourceHeight: Int, width: Int, height: Int): IntArray {
        require(argb.size == sourceWidth * sourceHeight) {
            "Got ${argb.size} pixels for a ${sourceWidth}x$sourceHeight image."
        }
        val targetRatio = width.toDouble() / height
        var cropWidth = sourceWidth.toDouble()
        var cropHeight = sourceHeight.toDouble()
        if (cropWidth / cropHeight > targetRatio) cropWidth = cropHeight * targetRatio else cropHeight = cropWidth / targetRatio
        val left = (sourceWidth - cropWidth) / 2
        val top = (sourceHeight - cropHeight) / 2
        val result = IntArray(width * height)
        for (y in 0 until height) {
            // Sample at pixel centers, as canvas drawImage does.
            val sy = (top + (y + 0.5) * cropHeight / height - 0.5).coerceIn(0.0, sourceHeight - 1.0)
            val y0 = sy.toInt()
            val y1 = minOf(y0 + 1, sourceHeight - 1)
            val fy = sy - y0
            for (x in 0 until width) {
                val sx = (left + (x + 0.5) * cropWidth / width - 0.5).coerceIn(0.0, sourceWidth - 1.0)
                val x0 = sx.toInt()
                val x1 = minOf(x0 + 1, sourceWidth - 1)
                val fx = sx - x0
                var pixel = 0xFF shl 24
                for (shift in intArrayOf(16, 8, 0)) {
                    fun channel(px: Int, py: Int) = (argb[py * sourceWidth + px] shr shift) and 0xFF
                    val topRow = channel(x0, y0) * (1 - fx) + channel(x1, y0) * fx
                    val bottomRow = channel(x0, y1) * (1 - fx) + channel(x1, y1) * fx
                    val value = Math.round(topRow * (1 - fy) + bottomRow * fy).toInt()
                    pixel = pixel or (value.coerceIn(0, 255) shl shift)
                }
                result[y * width + x] = pixel
            }
        }
        return result
    }

    /**
     * Converts ARGB pixels to the model's pixel layout, values in [0, 255].
     *
     * @param channels 1 for grayscale (ITU-R BT.601 luma weights 0.299,
     *     0.587, 0.114, rounded) or 3 for RGB, channels last.
     * @param invert replace each value v by 255 - v, for photos of dark
     *     shapes on a light background when the model was trained on light
     *     shapes on black (MNIST-style data).
     */
    fun argbToPixels(argb: IntArray, channels: Int, invert: Boolean = false): IntArray {
        require(channels == 1 || channels == 3) { "channels must be 1 or 3, got $channels" }
        val pixels = IntArray(argb.size * channels)
        for (i in argb.indices) {
            val r = (argb[i] shr 16) and 0xFF
            val g = (argb[i] shr 8) and 0xFF
            val b = argb[i] and 0xFF
            if (channels == 1) {
                pixels[i] = (r * 299 + g * 587 + b * 114 + 500) / 1000
            } else {
                pixels[3 * i] = r
                pixels[3 * i + 1] = g
                pixels[3 * i + 2] = b
            }
        }
        if (invert) {
            for (i in pixels.indices) pixels[i] = 255 - pixels[i]
        }
        return pixels
    }
}

object Quantization {
    /**
     * Quantizes pixels in [0, 255] to an int8 or uint8 input tensor.
     *
     * Rounds half to even (Math.rint), like numpy.round in the exporter.
     *
     * @return one byte per value; int8 values are stored as signed bytes.
     */
    fun quantize(pixels: IntArray, type: TensorType, params: QuantizationParams): ByteArray {
        require(type != TensorType.FLOAT32) { "A float32 input takes the pixel values unchanged." }
        val result = ByteArray(pixels.size)
        for (i in pixels.indices) {
            val value = Math.rint(pixels[i] / params.scale.toDouble()).toInt() + params.zeroPoint
            result[i] = value.coerceIn(type.min, type.max).toByte()
        }
        return result
    }

    /** Reads one raw output byte as the integer value of its type. */
    fun integerValue(raw: Byte, type: TensorType): Int =
        if (type == TensorType.UINT8) raw.toInt() and 0xFF else raw.toInt()

    /** Dequantizes an int8 or uint8 output tensor to float scores. */
    fun dequantize(raw: ByteArray, type: TensorType, params: QuantizationParams): FloatArray =
        FloatArray(raw.size) { (integerValue(raw[it], type) - params.zeroPoint) * params.scale }
}

object TopK {
    /** Returns the indices of the k highest scores; ties keep index order. */
    fun indices(scores: FloatArray, k: Int): List<Int> =
        scores.indices.sortedWith(compareBy<Int>({ -scores[it] }, { it })).take(k)

    /** Returns the k best predictions with their labels and verticals. */
    fun predictions(scores: FloatArray, metadata: KcMetadata, k: Int = 5): List<Prediction> =
        indices(scores, k).map { index -> metadata.describe(index, scores[index]) }
}
