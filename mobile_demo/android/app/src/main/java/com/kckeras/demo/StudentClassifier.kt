package com.kckeras.demo

import android.content.Context
import android.graphics.Bitmap
import com.kckeras.demo.processing.Assets
import com.kckeras.demo.processing.ImageProcessing
import com.kckeras.demo.processing.KcMetadata
import com.kckeras.demo.processing.ModelMetadataException
import com.kckeras.demo.processing.Prediction
import com.kckeras.demo.processing.Quantization
import com.kckeras.demo.processing.QuantizationParams
import com.kckeras.demo.processing.TensorType
import com.kckeras.demo.processing.TfliteMetadata
import com.kckeras.demo.processing.TopK
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Interpreter
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel

/** Result of one classification. */
data class Classification(val top5: List<Prediction>, val latencyMs: Double)

/**
 * The bundled student model in the LiteRT Interpreter, with its labels and
 * preprocessing read from the model's kc_keras metadata (or the model.json
 * sidecar asset when the model file has no entry). Not thread-safe: call it
 * from one background thread.
 */
class StudentClassifier(context: Context) : AutoCloseable {
    val metadata: KcMetadata
    private val interpreter: Interpreter
    private val inputType: TensorType
    private val inputQuantization: QuantizationParams
    private val outputType: TensorType
    private val outputQuantization: QuantizationParams
    private val numOutputs: Int
    private val inputBuffer: ByteBuffer
    private val outputBuffer: ByteBuffer

    init {
        val model = mapAsset(context, Assets.MODEL_ASSET)
        metadata = TfliteMetadata.readKcMetadata(model) ?: readSidecar(context)
        interpreter = Interpreter(model, Interpreter.Options().setNumThreads(4))
        val input = interpreter.getInputTensor(0)
        val output = interpreter.getOutputTensor(0)
        numOutputs = output.shape().last()
        // The interpreter's tensor types and quantization are authoritative;
        // the metadata must agree with them.
        inputType = tensorType(input.dataType())
        outputType = tensorType(output.dataType())
        inputQuantization = QuantizationParams(input.quantizationParams().scale, input.quantizationParams().zeroPoint)
        outputQuantization = QuantizationParams(output.quantizationParams().scale, output.quantizationParams().zeroPoint)
        val expectedShape = intArrayOf(1, metadata.height, metadata.width, metadata.channels)
        if (!input.shape().contentEquals(expectedShape)) {
            throw ModelMetadataException(
                "The model input has shape ${input.shape().contentToString()} but its metadata describes " +
                    "${expectedShape.contentToString()}. Re-export the model."
            )
        }
        metadata.validate(numOutputs, readLines(context, Assets.LABELS_ASSET))
        inputBuffer = ByteBuffer.allocateDirect(input.numBytes()).order(ByteOrder.nativeOrder())
        outputBuffer = ByteBuffer.allocateDirect(output.numBytes()).order(ByteOrder.nativeOrder())
    }

    /** Classifies a camera frame; `invert` is for dark shapes on light paper. */
    fun classify(bitmap: Bitmap, invert: Boolean): Classification {
        val argb = IntArray(bitmap.width * bitmap.height)
        bitmap.getPixels(argb, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height)
        val resized = ImageProcessing.centerCropResize(argb, bitmap.width, bitmap.height, metadata.width, metadata.height)
        return classifyPixels(ImageProcessing.argbToPixels(resized, metadata.channels, invert))
    }

    /** Classifies pixels in [0, 255], height x width x channels, row-major. */
    fun classifyPixels(pixels: IntArray): Classification {
        fillInput(pixels)
        val start = System.nanoTime()
        runOnce()
        val latencyMs = (System.nanoTime() - start) / 1e6
        return Classification(TopK.predictions(readScores(), metadata), latencyMs)
    }

    /** Median latency in milliseconds of `runs` inferences on a blank image. */
    fun benchmark(runs: Int = 50): Double {
        fillInput(IntArray(metadata.pixelCount))
        runOnce()
        val times = DoubleArray(runs) {
            val start = System.nanoTime()
            runOnce()
            (System.nanoTime() - start) / 1e6
        }
        times.sort()
        return if (runs % 2 == 1) times[runs / 2] else (times[runs / 2 - 1] + times[runs / 2]) / 2
    }

    override fun close() = interpreter.close()

    private fun fillInput(pixels: IntArray) {
        require(pixels.size == metadata.pixelCount) {
            "Got ${pixels.size} pixel values; the model expects ${metadata.pixelCount}."
        }
        inputBuffer.rewind()
        if (inputType == TensorType.FLOAT32) {
            for (value in pixels) inputBuffer.putFloat(value.toFloat())
        } else {
            inputBuffer.put(Quantization.quantize(pixels, inputType, inputQuantization))
        }
        inputBuffer.rewind()
    }

    private fun runOnce() {
        outputBuffer.rewind()
        interpreter.run(inputBuffer, outputBuffer)
    }

    private fun readScores(): FloatArray {
        outputBuffer.rewind()
        if (outputType == TensorType.FLOAT32) return FloatArray(numOutputs) { outputBuffer.float }
        val raw = ByteArray(numOutputs)
        outputBuffer.get(raw)
        return Quantization.dequantize(raw, outputType, outputQuantization)
    }

    private fun tensorType(type: DataType): TensorType = when (type) {
        DataType.INT8 -> TensorType.INT8
        DataType.UINT8 -> TensorType.UINT8
        DataType.FLOAT32 -> TensorType.FLOAT32
        else -> throw ModelMetadataException("Unsupported tensor type $type; the demo supports int8, uint8 and float32.")
    }

    private fun readSidecar(context: Context): KcMetadata {
        val text = try {
            context.assets.open(Assets.METADATA_ASSET).bufferedReader().use { it.readText() }
        } catch (error: java.io.IOException) {
            throw ModelMetadataException(
                "The model has no kc_keras metadata and ${Assets.METADATA_ASSET} is missing; " +
                    "run `make android-assets` with a model exported by `kc tflite`."
            )
        }
        return KcMetadata.fromJson(text)
    }

    private fun readLines(context: Context, name: String): List<String>? = try {
        context.assets.open(name).bufferedReader().use { reader -> reader.readLines().filter { it.isNotEmpty() } }
    } catch (error: java.io.IOException) {
        null
    }

    private fun mapAsset(context: Context, name: String): MappedByteBuffer {
        val descriptor = try {
            context.assets.openFd(name)
        } catch (error: java.io.IOException) {
            throw ModelMetadataException("$name is not in the app's assets; run `make android-assets` and rebuild.")
        }
        descriptor.use {
            FileInputStream(it.fileDescriptor).channel.use { channel ->
                return channel.map(FileChannel.MapMode.READ_ONLY, it.startOffset, it.declaredLength)
            }
        }
    }
}
