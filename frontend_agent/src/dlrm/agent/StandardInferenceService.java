package dlrm.agent;

import com.google.gson.JsonElement;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import io.grpc.MethodDescriptor;
import io.grpc.ServerBuilder;
import io.grpc.ServerInterceptors;
import io.grpc.ServerMethodDefinition;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.StatusException;
import io.grpc.stub.ServerCallStreamObserver;
import io.grpc.stub.ServerCalls;
import io.grpc.stub.StreamObserver;
import java.util.Optional;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.grpc.openinference.GRPCInferenceServiceGrpc;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataResponse.TensorMetadata;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelReadyRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelReadyResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerLiveRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerLiveResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerMetadataRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerMetadataResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerReadyRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerReadyResponse;
import org.pytorch.serve.grpcimpl.GRPCInterceptor;
import org.pytorch.serve.grpcimpl.OpenInferenceProtocolImpl;
import org.pytorch.serve.util.ConnectorType;
import org.pytorch.serve.util.GRPCUtils;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;

/**
 * The Open Inference Protocol's standard gRPC service, inference.GRPCInferenceService (KServe's
 * grpc_predict_v2.proto), on TorchServe's gRPC inference port beside TorchServe's own
 * org.pytorch.serve.grpc.openinference.GRPCInferenceService, which standard clients
 * (tritonclient.grpc, KServe's) cannot call (pytorch/serve#3394).
 *
 * <p>TorchServe's copy of the .proto has the standard messages field for field, so its message
 * classes and marshallers serve the standard method names unchanged. ModelInfer is TorchServe's
 * own (its job queue, batching and handler), with raw tensor contents converted
 * ({@link RawTensors}) and the handler's errors sent as a gRPC status (see {@link StandardAnswer}).
 * The other methods answer as the REST routes do ({@link OipModels}), not as TorchServe's own
 * service, whose ServerReady is always true, whose ModelReady counts restarting workers as ready,
 * and whose ModelMetadata lists no tensors. Calls pass TorchServe's GRPCInterceptor (token
 * authorization, access log) as its own service's do.
 *
 * <p>{@link StandardServiceRegistration} makes ModelServer call {@link #addService} where it adds
 * its own OIP service.
 */
public final class StandardInferenceService {
    static final String SERVICE_NAME = "inference.GRPCInferenceService";

    private StandardInferenceService() {}

    /**
     * In place of ModelServer's builder.addService(service): adds it, and after TorchServe's OIP
     * service the standard one too, behind the same interceptor.
     */
    public static ServerBuilder<?> addService(ServerBuilder<?> builder, ServerServiceDefinition service) {
        builder.addService(service);
        if (GRPCInferenceServiceGrpc.SERVICE_NAME.equals(service.getServiceDescriptor().getName())) {
            builder.addService(ServerInterceptors.intercept(
                    definition(), new GRPCInterceptor(ConnectorType.INFERENCE_CONNECTOR)));
        }
        return builder;
    }

    static ServerServiceDefinition definition() {
        OpenInferenceProtocolImpl torchServe = new OpenInferenceProtocolImpl();
        return ServerServiceDefinition.builder(SERVICE_NAME)
                .addMethod(method(GRPCInferenceServiceGrpc.getServerLiveMethod(), StandardInferenceService::serverLive))
                .addMethod(method(
                        GRPCInferenceServiceGrpc.getServerReadyMethod(), StandardInferenceService::serverReady))
                .addMethod(method(
                        GRPCInferenceServiceGrpc.getServerMetadataMethod(), StandardInferenceService::serverMetadata))
                .addMethod(method(GRPCInferenceServiceGrpc.getModelReadyMethod(), StandardInferenceService::modelReady))
                .addMethod(method(
                        GRPCInferenceServiceGrpc.getModelMetadataMethod(), StandardInferenceService::modelMetadata))
                .addMethod(method(
                        GRPCInferenceServiceGrpc.getModelInferMethod(),
                        (request, observer) -> modelInfer(torchServe, request, observer)))
                .build();
    }

    /** TorchServe's method under the standard service's name: the same messages and marshallers. */
    private static <Q, R> ServerMethodDefinition<Q, R> method(
            MethodDescriptor<Q, R> torchServes, ServerCalls.UnaryMethod<Q, R> implementation) {
        MethodDescriptor<Q, R> standard = torchServes.toBuilder()
                .setFullMethodName(
                        MethodDescriptor.generateFullMethodName(SERVICE_NAME, torchServes.getBareMethodName()))
                .setSchemaDescriptor(null) // TorchServe's descriptor names TorchServe's package
                .build();
        return ServerMethodDefinition.create(standard, ServerCalls.asyncUnaryCall(implementation));
    }

    private static void serverLive(ServerLiveRequest request, StreamObserver<ServerLiveResponse> observer) {
        answer(observer, ServerLiveResponse.newBuilder().setLive(true).build());
    }

    private static void serverReady(ServerReadyRequest request, StreamObserver<ServerReadyResponse> observer) {
        answer(observer, ServerReadyResponse.newBuilder().setReady(OipModels.serverReady()).build());
    }

    private static void serverMetadata(ServerMetadataRequest request, StreamObserver<ServerMetadataResponse> observer) {
        answer(observer, ServerMetadataResponse.newBuilder()
                .setName(OipModels.SERVER_NAME)
                .setVersion(OipModels.serverVersion())
                .addAllExtensions(OipModels.EXTENSIONS)
                .build());
    }

    private static void modelReady(ModelReadyRequest request, StreamObserver<ModelReadyResponse> observer) {
        try {
            Model model = model(request.getName(), request.getVersion());
            answer(observer, ModelReadyResponse.newBuilder().setReady(OipModels.isReady(model)).build());
        } catch (StatusException e) {
            observer.onError(e);
        }
    }

    private static void modelMetadata(ModelMetadataRequest request, StreamObserver<ModelMetadataResponse> observer) {
        try {
            OipModels.Metadata metadata = OipModels.metadata(model(request.getName(), request.getVersion()));
            ModelMetadataResponse.Builder response = ModelMetadataResponse.newBuilder()
                    .setName(metadata.name())
                    .addAllVersions(metadata.versions())
                    .setPlatform(metadata.platform());
            metadata.inputs().forEach(tensor -> response.addInputs(tensorMetadata(tensor)));
            metadata.outputs().forEach(tensor -> response.addOutputs(tensorMetadata(tensor)));
            answer(observer, response.build());
        } catch (StatusException e) {
            observer.onError(e);
        } catch (ModelNotFoundException e) { // unregistered meanwhile
            observer.onError(Status.NOT_FOUND.withDescription(e.getMessage()).asException());
        } catch (OipModels.InvalidMetadataException e) {
            observer.onError(Status.INTERNAL.withDescription(e.getMessage()).asException());
        }
    }

    private static TensorMetadata tensorMetadata(OipModels.Tensor tensor) {
        return TensorMetadata.newBuilder()
                .setName(tensor.name())
                .setDatatype(tensor.datatype())
                .addAllShape(tensor.shape())
                .build();
    }

    /**
     * TorchServe's ModelInfer on the request with typed contents. A model that is not registered
     * is NOT_FOUND here (TorchServe's answers INTERNAL).
     */
    private static void modelInfer(
            OpenInferenceProtocolImpl torchServe,
            ModelInferRequest request,
            StreamObserver<ModelInferResponse> observer) {
        try {
            model(request.getModelName(), request.getModelVersion());
            ModelInferRequest typed = RawTensors.typedInputs(request);
            // ServerCalls' observer of a unary call is a ServerCallStreamObserver, as TorchServe's code expects.
            torchServe.modelInfer(typed, new StandardAnswer((ServerCallStreamObserver<ModelInferResponse>) observer));
        } catch (StatusException e) {
            observer.onError(e);
        }
    }

    private static Model model(String name, String version) throws StatusException {
        if (name.isEmpty()) {
            throw Status.INVALID_ARGUMENT.withDescription("the model name is required").asException();
        }
        Model model;
        try {
            model = ModelManager.getInstance().getModel(name, version.isEmpty() ? null : version);
        } catch (ModelVersionNotFoundException e) {
            throw Status.NOT_FOUND.withDescription(e.getMessage()).asException();
        }
        if (model == null) {
            throw Status.NOT_FOUND.withDescription("Model not found: " + name).asException();
        }
        return model;
    }

    private static <R> void answer(StreamObserver<R> observer, R response) {
        observer.onNext(response);
        observer.onCompleted();
    }

    /**
     * The observer TorchServe's ModelInfer answers, in front of the call's own.
     *
     * <p>TorchServe's GRPCJob makes every answer of the handler an OK ModelInferResponse (it drops
     * the handler's status), so this project's handler answers a request it refuses over gRPC with
     * one BYTES output named "error" holding its JSON error body (handler/oip/codec.py, encode_error),
     * which TorchServe's own service passes on as it is. Standard clients expect a failed call
     * instead: here that answer becomes the gRPC status TorchServe maps the body's HTTP code to
     * (GRPCUtils: 400 INVALID_ARGUMENT, 413 RESOURCE_EXHAUSTED, ...) with the JSON body as its
     * message. Any other answer goes on with its outputs as raw contents.
     */
    private static final class StandardAnswer extends ServerCallStreamObserver<ModelInferResponse> {
        private final ServerCallStreamObserver<ModelInferResponse> call;
        private boolean failed;

        StandardAnswer(ServerCallStreamObserver<ModelInferResponse> call) {
            this.call = call;
        }

        @Override
        public void onNext(ModelInferResponse response) {
            Optional<Status> error = handlerError(response);
            if (error.isPresent()) {
                failed = true;
                call.onError(error.get().asException());
            } else {
                call.onNext(RawTensors.rawOutputs(response));
            }
        }

        @Override
        public void onCompleted() {
            if (!failed) {
                call.onCompleted();
            }
        }

        @Override
        public void onError(Throwable error) {
            call.onError(error);
        }

        private static Optional<Status> handlerError(ModelInferResponse response) {
            if (response.getOutputsCount() != 1
                    || !"error".equals(response.getOutputs(0).getName())
                    || !"BYTES".equals(response.getOutputs(0).getDatatype())
                    || response.getOutputs(0).getContents().getBytesContentsCount() != 1) {
                return Optional.empty();
            }
            String body = response.getOutputs(0).getContents().getBytesContents(0).toStringUtf8();
            try {
                JsonElement code = JsonParser.parseString(body).getAsJsonObject().get("code");
                if (code == null || !code.isJsonPrimitive() || !code.getAsJsonPrimitive().isNumber()) {
                    return Optional.empty();
                }
                return Optional.of(GRPCUtils.getGRPCStatusCode(code.getAsInt()).withDescription(body));
            } catch (JsonParseException | IllegalStateException | NumberFormatException e) { // a model's own output
                return Optional.empty();
            }
        }

        @Override
        public boolean isCancelled() {
            return call.isCancelled();
        }

        @Override
        public void setOnCancelHandler(Runnable handler) {
            call.setOnCancelHandler(handler);
        }

        @Override
        public void setOnCloseHandler(Runnable handler) {
            call.setOnCloseHandler(handler);
        }

        @Override
        public void setCompression(String compression) {
            call.setCompression(compression);
        }

        @Override
        public void disableAutoRequest() {
            call.disableAutoRequest();
        }

        @Override
        public void disableAutoInboundFlowControl() {
            call.disableAutoInboundFlowControl();
        }

        @Override
        public boolean isReady() {
            return call.isReady();
        }

        @Override
        public void setOnReadyHandler(Runnable handler) {
            call.setOnReadyHandler(handler);
        }

        @Override
        public void request(int count) {
            call.request(count);
        }

        @Override
        public void setMessageCompression(boolean enable) {
            call.setMessageCompression(enable);
        }
    }
}
