package com.kckeras.demo.processing

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.nio.ByteBuffer

/**
 * Checks the processing code against golden.json, which `kc tflite` writes
 * with Python LiteRT: for a few test images, the input pixels, the
 * expected quantized input tensor and the expected top-5.
 */
class ProcessingTest {
    private val golden: JSONObject by lazy {
        val stream = javaClass.classLoader!!.getResourceAsStream("golden.json")
            ?: throw AssertionError("golden.json is not on the test classpath; run `make android-assets`")
        JSONObject(stream.bufferedReader().readText())
    }

    private val modelFile: File by lazy {
        File(System.getProperty("kc.assets") ?: "src/main/assets", Assets.MODEL_ASSET)
    }

    private fun ints(array: JSONArray) = IntArray(array.length()) { array.getInt(it) }

    private fun cases() = golden.getJSONArray("cases").let { all -> List(all.length()) { all.getJSONObject(it) } }

    private fun inputType() = TensorType.fromName(golden.getJSONObject("input").getString("dtype"))

    private fun inputQuantization() = golden.getJSONObject("input").let {
        QuantizationParams(it.getDouble("scale").toFloat(), it.getInt("zero_point"))
    }

    @Test
    fun quantizeMatchesGoldenInputTensor() {
        assertTrue("golden.json has no cases", cases().isNotEmpty())
        for (case in cases()) {
            val pixels = ints(case.getJSONArray("pixels"))
            val expected = ints(case.getJSONArray("input_tensor"))
            val tensor = Quantization.quantize(pixels, inputType(), inputQuantization())
            val actual = IntArray(tensor.size) { Quantization.integerValue(tensor[it], inputType()) }
            assertArrayEquals("case ${case.getInt("test_index")}", expected, actual)
        }
    }

    @Test
    fun topKMatchesGoldenOrder() {
        for (case in cases()) {
            val top5 = case.getJSONArray("top5")
            val expected = List(top5.length()) { top5.getJSONObject(it).getInt("index") }
            // Scores for the golden indices, in a shuffled output vector:
            // top-k must restore the golden order.
            val scores = FloatArray(maxOf(expected.fold(0) { a, b -> maxOf(a, b) }, 5) + 1) { -1f }
            for (rank in expected.indices) {
                scores[expected[rank]] = top5.getJSONObject(rank).getDouble("score").toFloat()
            }
            assertEquals("case ${case.getInt("test_index")}", expected, TopK.indices(scores, expected.size))
        }
    }

    @Test
    fun goldenLabelsMatchModelMetadata() {
        if (!modelFile.isFile) fail("$modelFile not found; run `make android-assets`")
        val metadata = TfliteMetadata.readKcMetadata(ByteBuffer.wrap(modelFile.readBytes()))
        assertNotNull("the bundled model has no kc_keras metadata", metadata)
        for (case in cases()) {
            val top5 = case.getJSONArray("top5")
            for (rank in 0 until top5.length()) {
                val entry = top5.getJSONObject(rank)
                val prediction = metadata!!.describe(entry.getInt("index"), entry.getDouble("score").toFloat())
                assertEquals(entry.getString("label"), prediction.label)
            }
        }
    }

    @Test
    fun quantizeRoundsHalfToEvenAndClamps() {
        val params = QuantizationParams(2f, -128)
        // 1/2 = 0.5 -> 0, 3/2 = 1.5 -> 2, 255/2 = 127.5 -> 128 -> clamped.
        val tensor = Quantization.quantize(intArrayOf(1, 3, 255, 0), TensorType.INT8, params)
        assertArrayEquals(byteArrayOf(-128, -126, 0, -128), tensor)
    }

    @Test
    fun dequantizeReadsUint8AsUnsigned() {
        val scores = Quantization.dequantize(byteArrayOf(-1, 0), TensorType.UINT8, QuantizationParams(0.5f, 0))
        assertEquals(127.5f, scores[0], 0f)
        assertEquals(0f, scores[1], 0f)
    }

    @Test
    fun grayscaleUsesLuma() {
        val argb = intArrayOf(0xFFFFFFFF.toInt(), 0xFF000000.toInt(), 0xFFFF0000.toInt())
        assertArrayEquals(intArrayOf(255, 0, 76), ImageProcessing.argbToPixels(argb, 1))
        assertArrayEquals(intArrayOf(0, 255, 179), ImageProcessing.argbToPixels(argb, 1, invert = true))
    }

    @Test
    fun resizeKeepsSameSizeImage() {
        val argb = IntArray(6) { 0xFF000000.toInt() or (it * 40 shl 8) }
        assertArrayEquals(argb, ImageProcessing.centerCropResize(argb, 3, 2, 3, 2))
    }

    @Test
    fun resizeCropsToAspectRatio() {
        // A 4x2 image whose middle two columns are white: the square crop
        // keeps only them.
        val white = 0xFFFFFFFF.toInt()
        val black = 0xFF000000.toInt()
        val argb = intArrayOf(black, white, white, black, black, white, white, black)
        val result = ImageProcessing.centerCropResize(argb, 4, 2, 2, 2)
        assertArrayEquals(IntArray(4) { white }, result)
    }

    @Test
    fun metadataRejectsLabelCountMismatch() {
        if (!modelFile.isFile) fail("$modelFile not found; run `make android-assets`")
        val metadata = TfliteMetadata.readKcMetadata(ByteBuffer.wrap(modelFile.readBytes()))!!
        try {
            metadata.validate(metadata.labels.size + 1, null)
            fail("validate accepted a wrong output count")
        } catch (error: ModelMetadataException) {
            assertTrue(error.message!!.contains("labels but the model has"))
        }
    }

    @Test
    fun readEntriesRejectsNonTflite() {
        try {
            TfliteMetadata.readEntries(ByteBuffer.wrap(ByteArray(16)))
            fail("readEntries accepted a file without the TFL3 identifier")
        } catch (error: ModelMetadataException) {
            assertTrue(error.message!!.contains("TFL3"))
        }
    }
}
