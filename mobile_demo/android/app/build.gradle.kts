plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
}

android {
    namespace = "com.kckeras.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "com.kckeras.demo"
        minSdk = 24
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    kotlinOptions {
        jvmTarget = "17"
    }

    // The interpreter memory-maps the model, which needs it uncompressed.
    androidResources {
        noCompress += "tflite"
    }

    testOptions {
        unitTests.all {
            // The golden-vector test also parses the bundled model.
            it.systemProperty("kc.assets", file("src/main/assets").absolutePath)
        }
    }
}

// The run folder of the export to bundle, relative to this Android project:
// ./gradlew assembleDebug -PkcRun=../../runs/kanji-2136 -PkcModel=student_ptq-int8
val kcRun = (findProperty("kcRun") as String?) ?: "../../runs/trio-30"
val kcModel = (findProperty("kcModel") as String?) ?: "student_qat-int8"
val kcExport = rootProject.file("$kcRun/tflite")

val copyKcAssets by tasks.registering(Copy::class) {
    description = "Copies the student export, its metadata sidecar and labels into src/main/assets."
    from(kcExport) {
        include("$kcModel.tflite")
        rename { "model.tflite" }
    }
    from(kcExport) {
        include("$kcModel.json")
        rename { "model.json" }
    }
    from(kcExport) {
        include("labels.txt")
    }
    into("src/main/assets")
    doFirst {
        if (!kcExport.resolve("$kcModel.tflite").isFile) {
            throw GradleException("$kcExport/$kcModel.tflite not found; run `make tflite` in the repository first")
        }
    }
}

val copyKcGolden by tasks.registering(Copy::class) {
    description = "Copies golden.json, the expected pre/post-processing of a few test images, for the unit tests."
    from(kcExport) {
        include("golden.json")
    }
    into("src/test/resources")
}

tasks.named("preBuild") {
    dependsOn(copyKcAssets, copyKcGolden)
}

dependencies {
    implementation(libs.androidx.core.ktx)
    implementation(libs.androidx.appcompat)
    implementation(libs.androidx.camera.camera2)
    implementation(libs.androidx.camera.lifecycle)
    implementation(libs.androidx.camera.view)
    implementation(libs.litert)

    testImplementation(libs.junit)
    // Android's org.json is a stub in local unit tests; use the real one.
    testImplementation(libs.org.json)
}
